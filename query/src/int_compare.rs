//! Comparisons of an integer column with a float literal, made integer comparisons.
//!
//! Line protocol writes `usage=58i` as an integer field, and dashboards compare it with
//! whatever literal they hold (`WHERE usage > 90.0`). SQL's coercion casts the column:
//! `CAST(usage AS Float64) > 90.0` converts every row before comparing, and the Parquet
//! reader applies it row by row while decoding. [`IntCompare`] rewrites it in `WHERE`
//! clauses to the integer comparison that keeps the same rows (`usage > 90`).
//!
//! It is exact for literals below 2^53 in magnitude: every integer that size is a float,
//! and a larger integer, rounded to a float, stays on the same side of the literal. Other
//! literals (larger, infinite, NaN) and `=`/`!=` with a fraction are left as they are.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue};
use datafusion::logical_expr::{BinaryExpr, Cast, Expr, ExprSchemable, LogicalPlan, Operator};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// Floats this size and above may stand for several integers.
const EXACT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53

/// The optimizer rule; see the module documentation.
#[derive(Debug, Default)]
pub struct IntCompare;

impl OptimizerRule for IntCompare {
    fn name(&self) -> &str {
        "kiln_int_compare"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        // Only filters: their expressions name no output column, so rewriting one changes
        // no schema.
        plan.transform_up_with_subqueries(|node| {
            let LogicalPlan::Filter(mut filter) = node else {
                return Ok(Transformed::no(node));
            };
            let schema = filter.input.schema().clone();
            let rewritten = filter.predicate.transform_up(|e| Ok(rewrite(e, &schema)))?;
            filter.predicate = rewritten.data;
            Ok(Transformed::new_transformed(
                LogicalPlan::Filter(filter),
                rewritten.transformed,
            ))
        })
    }
}

/// `CAST(int AS Float64) op float` (either way round) as `int op' integer`, if exact.
fn rewrite(expr: Expr, schema: &DFSchema) -> Transformed<Expr> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &expr else {
        return Transformed::no(expr);
    };
    let (cast, value, op) = match (left.as_ref(), right.as_ref()) {
        (Expr::Cast(c), Expr::Literal(ScalarValue::Float64(Some(v)), _)) => (c, *v, *op),
        (Expr::Literal(ScalarValue::Float64(Some(v)), _), Expr::Cast(c)) => match op.swap() {
            Some(op) => (c, *v, op),
            None => return Transformed::no(expr),
        },
        _ => return Transformed::no(expr),
    };
    let Cast { expr: inner, field } = cast;
    if field.data_type() != &DataType::Float64 {
        return Transformed::no(expr);
    }
    let Some((op, bound)) = integer_bound(op, value) else {
        return Transformed::no(expr);
    };
    let literal = match inner.get_type(schema) {
        Ok(DataType::Int64) => ScalarValue::Int64(Some(bound)),
        Ok(DataType::UInt64) if bound >= 0 => ScalarValue::UInt64(Some(bound as u64)),
        _ => return Transformed::no(expr),
    };
    Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
        inner.clone(),
        op,
        Box::new(Expr::Literal(literal, None)),
    )))
}

/// For `(x as f64) op value`, the `op'` and integer `b` with which `x op' b` keeps the
/// same integers `x`; `None` where that is not exact.
fn integer_bound(op: Operator, value: f64) -> Option<(Operator, i64)> {
    if !value.is_finite() || value.abs() >= EXACT_LIMIT {
        return None;
    }
    let (floor, ceil) = (value.floor() as i64, value.ceil() as i64);
    let whole = value.fract() == 0.0;
    Some(match op {
        Operator::Gt => (Operator::Gt, floor),
        Operator::GtEq => (Operator::GtEq, ceil),
        Operator::Lt => (Operator::Lt, ceil),
        Operator::LtEq => (Operator::LtEq, floor),
        Operator::Eq if whole => (Operator::Eq, floor),
        Operator::NotEq if whole => (Operator::NotEq, floor),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::{col, lit};
    use proptest::prelude::*;

    use super::*;

    fn holds<T: PartialOrd>(op: Operator, a: T, b: T) -> bool {
        match op {
            Operator::Gt => a > b,
            Operator::GtEq => a >= b,
            Operator::Lt => a < b,
            Operator::LtEq => a <= b,
            Operator::Eq => a == b,
            Operator::NotEq => a != b,
            _ => unreachable!(),
        }
    }

    const OPS: [Operator; 6] = [
        Operator::Gt,
        Operator::GtEq,
        Operator::Lt,
        Operator::LtEq,
        Operator::Eq,
        Operator::NotEq,
    ];

    proptest! {
        #[test]
        fn keeps_the_integers_the_float_comparison_keeps(
            op in 0..OPS.len(),
            value in prop_oneof![
                any::<f64>(),
                (-1000i64..1000).prop_map(|v| v as f64 / 4.0),
                Just(EXACT_LIMIT - 1.0),
                Just(-(EXACT_LIMIT - 1.0)),
                Just(EXACT_LIMIT - 0.5),
            ],
            delta in -3i64..=3,
            other in any::<i64>(),
        ) {
            let op = OPS[op];
            let Some((op2, bound)) = integer_bound(op, value) else { return Ok(()) };
            let near = (value as i64).saturating_add(delta);
            for x in [near, other, i64::MAX, i64::MIN, 0] {
                prop_assert_eq!(
                    holds(op, x as f64, value),
                    holds(op2, x, bound),
                    "{} {} {} vs {} {} {}", x, op, value, x, op2, bound
                );
            }
        }
    }

    #[test]
    fn rewrites_filters_on_integer_columns_only() {
        let schema = DFSchema::try_from(Schema::new(vec![
            Field::new("i", DataType::Int64, true),
            Field::new("u", DataType::UInt64, true),
            Field::new("f", DataType::Float64, true),
        ]))
        .unwrap();
        let cast = |c: &str| col(c).cast_to(&DataType::Float64, &schema).unwrap();
        let done = |e: Expr| rewrite(e, &schema);

        let r = done(cast("i").gt(lit(90.5)));
        assert!(r.transformed);
        assert_eq!(r.data, col("i").gt(lit(90i64)));
        let r = done(lit(2.5).lt_eq(cast("i")));
        assert_eq!(r.data, col("i").gt_eq(lit(3i64)));
        let r = done(cast("u").lt(lit(7.0)));
        assert_eq!(r.data, col("u").lt(lit(7u64)));

        // Not exact, or not an integer column: unchanged.
        for e in [
            cast("i").eq(lit(2.5)),
            cast("i").gt(lit(f64::NAN)),
            cast("i").gt(lit(1e17)),
            cast("u").gt(lit(-1.5)),
            col("f").gt(lit(1.5)),
            cast("i").gt(lit(ScalarValue::Float64(None))),
        ] {
            let r = done(e.clone());
            assert!(!r.transformed, "{e}");
            assert_eq!(r.data, e);
        }
    }
}
