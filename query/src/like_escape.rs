//! `LIKE … ESCAPE 'c'` with an escape character other than the backslash.
//!
//! SQL lets a `LIKE` pattern name its own escape character (`name NOT LIKE 'pg/_%' ESCAPE
//! '/'`, as SQLAlchemy writes when it lists schemas); DataFusion executes only the
//! backslash. [`LikeEscape`] rewrites such a pattern into the same pattern escaped with
//! backslashes, through [`like_pattern`] (`like_escape_pattern(pattern, 'c')`, folded to a
//! literal when the pattern is one), so the same rows match.

use std::sync::Arc;

use arrow::array::{Array, AsArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{
    ColumnarValue, Expr, Like, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility, lit,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// The optimizer rule; see the module documentation.
#[derive(Debug, Default)]
pub struct LikeEscape;

impl OptimizerRule for LikeEscape {
    fn name(&self) -> &str {
        "kiln_like_escape"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        plan.transform_up_with_subqueries(|node| {
            let names = NamePreserver::new(&node);
            node.map_expressions(|expr| {
                let name = names.save(&expr);
                let rewritten = expr.transform_up(|e| Ok(rewrite(e)))?;
                Ok(rewritten.update_data(|e| name.restore(e)))
            })
        })
    }
}

fn rewrite(expr: Expr) -> Transformed<Expr> {
    let Expr::Like(like) = expr else {
        return Transformed::no(expr);
    };
    let Some(escape) = like.escape_char.filter(|c| *c != '\\') else {
        return Transformed::no(Expr::Like(like));
    };
    let Like {
        negated,
        expr,
        pattern,
        case_insensitive,
        ..
    } = like;
    let pattern = Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction::new_udf(
        Arc::new(like_escape_pattern()),
        vec![*pattern, lit(escape.to_string())],
    ));
    Transformed::yes(Expr::Like(Like::new(
        negated,
        expr,
        Box::new(pattern),
        None,
        case_insensitive,
    )))
}

/// `pattern` written with `escape` as its escape character, written with backslashes:
/// `escape` before a character makes it literal (`\%`, `\_`, `\\`, or the character
/// itself), and a backslash that is not escaped is a literal one (`\\`).
pub fn like_pattern(pattern: &str, escape: char) -> Result<String> {
    let mut out = String::with_capacity(pattern.len() + 2);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == escape {
            let Some(next) = chars.next() else {
                return exec_err!("LIKE pattern must not end with escape character");
            };
            if matches!(next, '%' | '_' | '\\') {
                out.push('\\');
            }
            out.push(next);
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn like_escape_pattern() -> ScalarUDF {
    ScalarUDF::new_from_impl(LikeEscapePattern {
        signature: Signature::any(2, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct LikeEscapePattern {
    signature: Signature,
}

impl ScalarUDFImpl for LikeEscapePattern {
    fn name(&self) -> &str {
        "like_escape_pattern"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The pattern's own type, which type coercion matched to the `LIKE`'s left side.
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        // Made by the rule after type coercion: the pattern may be any string type.
        let escape = match &args.args[1] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(e))) if e.chars().count() == 1 => {
                e.chars().next().unwrap_or('\\')
            }
            _ => return exec_err!("invalid escape string: it must be one character"),
        };
        let scalar = matches!(args.args[0], ColumnarValue::Scalar(_));
        let patterns = args.args[0].to_array(args.number_rows)?;
        let patterns = arrow::compute::cast(&patterns, &DataType::Utf8)?;
        let patterns = patterns.as_string::<i32>();
        let mut out = StringBuilder::with_capacity(patterns.len(), 16);
        for i in 0..patterns.len() {
            if patterns.is_null(i) {
                out.append_null();
            } else {
                out.append_value(like_pattern(patterns.value(i), escape)?);
            }
        }
        let out = arrow::compute::cast(&out.finish(), args.return_field.data_type())?;
        if scalar {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?));
        }
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::like_pattern;

    #[test]
    fn patterns_are_escaped_with_backslashes() {
        assert_eq!(like_pattern("pg/_%", '/').unwrap(), r"pg\_%");
        assert_eq!(like_pattern("100/%", '/').unwrap(), r"100\%");
        assert_eq!(like_pattern("a//b", '/').unwrap(), "a/b");
        assert_eq!(like_pattern(r"a\b", '/').unwrap(), r"a\\b");
        assert_eq!(like_pattern(r"a/\b", '/').unwrap(), r"a\\b");
        assert_eq!(like_pattern("a/x", '/').unwrap(), "ax");
        assert_eq!(like_pattern("a!%", '!').unwrap(), r"a\%");
        assert!(like_pattern("a/", '/').is_err());
    }
}
