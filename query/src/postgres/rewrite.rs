//! PostgreSQL spellings DataFusion plans differently, rewritten before planning.
//!
//! Tools send PostgreSQL's SQL as PostgreSQL answers it. Where DataFusion cannot plan the
//! same text, a PostgreSQL session rewrites the statement first, into SQL DataFusion plans
//! with the same answer (the rest of the client compatibility, `pg_catalog` and its
//! functions, is `datafusion-pg-catalog`'s, which sees the statement after this):
//!
//! | PostgreSQL | becomes | who sends it |
//! |---|---|---|
//! | `x IN (<the schemas of search_path, from generate_series(…) AS i, string_to_array(current_setting('search_path'), ',') s>)` | `x IN ('public')`: the list of the connection's search path, `"$user"` being the user | Grafana's table and column pickers |
//! | `user` | `current_user` | Grafana |
//! | `information_schema._pg_expandarray(a)` | `_pg_expandarray(a)` | pgJDBC's `getPrimaryKeys`, `getIndexInfo` |
//! | `(f(x)).field`, a field of a computed composite | `(f(x))['field']` | pgJDBC |
//! | `generate_subscripts(a, d)` | `unnest(generate_series(array_lower(a, d), array_upper(a, d)))` | SQLAlchemy's reflection |
//! | a correlated subquery over `pg_catalog` inside a select-list expression (`CASE WHEN … THEN (SELECT … FROM pg_attrdef WHERE adrelid = attrelid) END`) | `NULL` | SQLAlchemy's column reflection |
//! | `SHOW name` | `SELECT current_setting('name') AS name` | psql, JDBC, BI tools |
//!
//! DataFusion cannot plan a correlated subquery inside a conditional expression. The ones
//! tools send ask about column defaults, identity sequences and collations, which Kiln's
//! tables do not have, so NULL is their answer (`datafusion-pg-catalog` does the same for
//! such a subquery that is a whole select-list item). A statement that needs none of these
//! is passed on as the client wrote it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    AccessExpr, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, ObjectName, Query,
    Select, SelectItem, SetExpr, Statement, Subscript, TableFactor, Value, Visit, VisitMut,
    Visitor, VisitorMut,
};

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::settings::PgSettings;

/// A statement a PostgreSQL session does not run (see [`allowed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Whether a PostgreSQL session runs `statement`. SQL reads: queries, `EXPLAIN` of one,
/// `SHOW`, `SET` of session settings, transactions and cursors as drivers send them. No
/// DDL (`CREATE`, `DROP`, `ALTER`: the session's in-memory catalog stays as Kiln made it),
/// no `COPY`, no `INSERT`/`UPDATE`/`DELETE`, and no `SET` of DataFusion's runtime or catalog
/// options (memory limit, temporary directory), which would take a session out of the
/// server's shared limits.
pub fn allowed(statement: &Statement) -> Result<(), Refused> {
    use datafusion::sql::sqlparser::ast::Set;
    let refuse = |what: &str| {
        Err(Refused(format!(
            "{what} is not allowed: Kiln's SQL reads data; write through the write APIs"
        )))
    };
    let check_setting = |name: &ObjectName| {
        let name = name.to_string().to_ascii_lowercase();
        if name.starts_with("datafusion.runtime") || name.starts_with("datafusion.catalog") {
            return Err(Refused(format!(
                "SET {name} is not allowed: the server's limits hold for every session"
            )));
        }
        Ok(())
    };
    match statement {
        Statement::Query(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowSchemas { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Deallocate { .. }
        | Statement::Discard { .. }
        | Statement::Execute { .. } => Ok(()),
        Statement::Prepare { statement, .. } => allowed(statement),
        Statement::Explain { statement, .. } => allowed(statement),
        Statement::ExplainTable { .. } => Ok(()),
        Statement::Set(set) => match set {
            Set::SingleAssignment { variable, .. } => check_setting(variable),
            Set::ParenthesizedAssignments { variables, .. } => {
                variables.iter().try_for_each(check_setting)
            }
            Set::MultipleAssignments { assignments } => {
                assignments.iter().try_for_each(|a| check_setting(&a.name))
            }
            _ => Ok(()),
        },
        Statement::Copy { .. } => refuse("COPY"),
        Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_) => {
            refuse("INSERT, UPDATE and DELETE")
        }
        other => {
            let text = other.to_string();
            let verb: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            refuse(&verb)
        }
    }
}

/// Rewrites `sql` (see the module docs) for a connection with `settings`, refusing a
/// statement a session does not run ([`allowed`]). Text that does not parse is passed on
/// unchanged, for the planner to report.
pub fn rewrite<'a>(sql: &'a str, settings: &PgSettings) -> Result<Cow<'a, str>, Refused> {
    let Ok(mut statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return Ok(Cow::Borrowed(sql));
    };
    statements.iter().try_for_each(allowed)?;
    let mut rewriter = Rewriter {
        settings,
        changed: false,
    };
    let _ = VisitMut::visit(&mut statements, &mut rewriter);
    if !rewriter.changed {
        return Ok(Cow::Borrowed(sql));
    }
    Ok(Cow::Owned(
        statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(";\n"),
    ))
}

struct Rewriter<'a> {
    settings: &'a PgSettings,
    changed: bool,
}

/// The function's own name, without a `pg_catalog.` (or `information_schema.`) qualifier,
/// in lowercase.
fn function_name(name: &ObjectName) -> Option<String> {
    let (last, qualifiers) = name.0.split_last()?;
    let system = qualifiers.iter().all(|p| {
        p.as_ident().is_some_and(|i| {
            i.value.eq_ignore_ascii_case("pg_catalog")
                || i.value.eq_ignore_ascii_case("information_schema")
        })
    });
    system.then(|| last.as_ident().map(|i| i.value.to_ascii_lowercase()))?
}

fn parse<T>(text: &str, f: impl FnOnce(&mut Parser<'_>) -> Option<T>) -> Option<T> {
    let mut parser = Parser::new(&PostgreSqlDialect {}).try_with_sql(text).ok()?;
    f(&mut parser)
}

/// Whether `query` reads the elements of `string_to_array(current_setting('search_path'),
/// …)` in its `FROM`, as Grafana's search path subquery does.
fn reads_search_path(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    select.from.iter().any(|from| {
        let TableFactor::Table {
            name,
            args: Some(args),
            ..
        } = &from.relation
        else {
            return false;
        };
        function_name(name).as_deref() == Some("string_to_array")
            && args.args.first().is_some_and(|arg| {
                let FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Function(f))) = arg else {
                    return false;
                };
                let FunctionArguments::List(list) = &f.args else {
                    return false;
                };
                function_name(&f.name).as_deref() == Some("current_setting")
                    && matches!(
                        list.args.first(),
                        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))))
                            if matches!(&v.value, Value::SingleQuotedString(s) if s.eq_ignore_ascii_case("search_path"))
                    )
            })
    })
}

/// The relations a `FROM` names, as a column qualifier may name them: alias, table name
/// and `schema.table`.
fn relation_names(select: &Select) -> Option<(HashSet<String>, bool)> {
    let mut names = HashSet::new();
    let mut all_catalog = true;
    let factors = select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)));
    for factor in factors {
        let TableFactor::Table {
            name, alias, args, ..
        } = factor
        else {
            return None;
        };
        if args.is_some() {
            return None;
        }
        let parts: Vec<String> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(|i| i.value.to_ascii_lowercase()))
            .collect();
        let table = parts.last()?.clone();
        all_catalog &= match parts.as_slice() {
            [schema, _] => schema == "pg_catalog",
            [table] => table.starts_with("pg_"),
            _ => false,
        };
        names.insert(parts.join("."));
        names.insert(table);
        if let Some(alias) = alias {
            names.insert(alias.name.value.to_ascii_lowercase());
        }
    }
    Some((names, all_catalog))
}

/// Whether `query` is a `SELECT` over `pg_catalog` tables only that refers to a column of
/// an enclosing query.
fn correlated_catalog_subquery(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let Some((names, true)) = relation_names(select) else {
        return false;
    };
    if names.is_empty() {
        return false;
    }
    struct Outer<'a> {
        names: &'a HashSet<String>,
    }
    impl Visitor for Outer<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::CompoundIdentifier(idents) = expr
                && let Some((_, qualifier)) = idents.split_last()
            {
                let qualifier = qualifier
                    .iter()
                    .map(|i| i.value.to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(".");
                if !self.names.contains(&qualifier) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    Visit::visit(select, &mut Outer { names: &names }).is_break()
}

/// Replaces, inside `expr` (not `expr` itself), every correlated subquery over
/// `pg_catalog` by NULL.
fn null_nested_catalog_subqueries(expr: &mut Expr) -> bool {
    struct Nested {
        depth: usize,
        changed: bool,
    }
    impl VisitorMut for Nested {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
            self.depth += 1;
            if self.depth > 1
                && let Expr::Subquery(query) = expr
                && correlated_catalog_subquery(query)
            {
                *expr = Expr::value(Value::Null);
                self.changed = true;
            }
            ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, _expr: &mut Expr) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
    }
    let mut nested = Nested {
        depth: 0,
        changed: false,
    };
    let _ = VisitMut::visit(expr, &mut nested);
    nested.changed
}

impl Rewriter<'_> {
    /// The schemas of the search path as Grafana's subquery computes them: each element
    /// trimmed, `"$user"` standing for the user.
    fn search_path(&self) -> Vec<Expr> {
        let path = self.settings.get("search_path").unwrap_or_default();
        path.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "\"$user\"" => self.settings.user(),
                s => s.to_owned(),
            })
            .map(|s| Expr::value(Value::SingleQuotedString(s)))
            .collect()
    }

    fn query(&self, query: &mut Query) -> bool {
        let SetExpr::Select(select) = query.body.as_mut() else {
            return false;
        };
        let mut changed = false;
        for item in &mut select.projection {
            if let SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } = item {
                changed |= null_nested_catalog_subqueries(expr);
            }
        }
        changed
    }

    fn expr(&self, expr: &Expr) -> Option<Expr> {
        if let Expr::InSubquery {
            expr,
            subquery,
            negated,
        } = expr
            && reads_search_path(subquery)
        {
            return Some(Expr::InList {
                expr: expr.clone(),
                list: self.search_path(),
                negated: *negated,
            });
        }
        // `(composite).field` of a computed value: DataFusion spells it `value['field']`.
        if let Expr::CompoundFieldAccess { root, access_chain } = expr
            && !matches!(
                root.as_ref(),
                Expr::Identifier(_) | Expr::CompoundIdentifier(_)
            )
            && access_chain
                .iter()
                .any(|a| matches!(a, AccessExpr::Dot(Expr::Identifier(_))))
        {
            let access_chain = access_chain
                .iter()
                .map(|a| match a {
                    AccessExpr::Dot(Expr::Identifier(field)) => {
                        AccessExpr::Subscript(Subscript::Index {
                            index: Expr::value(Value::SingleQuotedString(field.value.clone())),
                        })
                    }
                    other => other.clone(),
                })
                .collect();
            return Some(Expr::CompoundFieldAccess {
                root: root.clone(),
                access_chain,
            });
        }
        let Expr::Function(f) = expr else {
            return None;
        };
        let name = function_name(&f.name)?;
        match (name.as_str(), &f.args) {
            // `user` without parentheses is the current user, as `current_user` is.
            ("user", FunctionArguments::None) if f.name.0.len() == 1 => {
                let mut renamed = f.clone();
                renamed.name = ObjectName::from(vec![Ident::new("current_user")]);
                Some(Expr::Function(renamed))
            }
            // A function of `information_schema` (pgJDBC's key reflection): Kiln's are global.
            ("_pg_expandarray", _) if f.name.0.len() > 1 => {
                let mut renamed = f.clone();
                renamed.name = ObjectName::from(vec![Ident::new(name)]);
                Some(Expr::Function(renamed))
            }
            ("generate_subscripts", FunctionArguments::List(list)) if list.args.len() == 2 => {
                let (array, dim) = (&list.args[0], &list.args[1]);
                parse(
                    &format!(
                        "unnest(generate_series(array_lower({array}, {dim}), array_upper({array}, {dim})))"
                    ),
                    |p| p.parse_expr().ok(),
                )
            }
            _ => None,
        }
    }

    fn statement(&self, statement: &Statement) -> Option<Statement> {
        let Statement::ShowVariable { variable } = statement else {
            return None;
        };
        let words: Vec<String> = variable
            .iter()
            .map(|i| i.value.to_ascii_lowercase())
            .collect();
        let name = match words.join(" ").as_str() {
            // PostgreSQL's list of every setting, and DataFusion's own options: as before.
            "all" => return None,
            n if n.starts_with("datafusion.") => return None,
            "transaction isolation level" => "transaction_isolation".to_owned(),
            "time zone" => "timezone".to_owned(),
            n if words.len() == 1 => n.to_owned(),
            _ => return None,
        };
        let column = PgSettings::display_name(&name).replace('"', "\"\"");
        let literal = name.replace('\'', "''");
        parse(
            &format!("SELECT current_setting('{literal}') AS \"{column}\""),
            |p| p.parse_statement().ok(),
        )
    }
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        self.changed |= self.query(query);
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Some(new) = self.expr(expr) {
            *expr = new;
            self.changed = true;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, statement: &mut Statement) -> ControlFlow<()> {
        if let Some(new) = self.statement(statement) {
            *statement = new;
            self.changed = true;
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        let settings = PgSettings::default();
        settings.sync(&std::collections::HashMap::from([(
            "user".to_owned(),
            "grafana".to_owned(),
        )]));
        rewrite(sql, &settings).unwrap().into_owned()
    }

    #[test]
    fn grafanas_search_path_subquery_reads_the_setting() {
        let grafana = r#"SELECT quote_ident(table_name) FROM information_schema.tables WHERE
            quote_ident(table_schema) IN (
              SELECT CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
              FROM generate_series(
                  array_lower(string_to_array(current_setting('search_path'),','),1),
                  array_upper(string_to_array(current_setting('search_path'),','),1)
                ) as i,
                string_to_array(current_setting('search_path'),',') s)"#;
        assert_eq!(
            rewritten(grafana),
            "SELECT quote_ident(table_name) FROM information_schema.tables WHERE \
             quote_ident(table_schema) IN ('grafana', 'public')"
        );
        let negated = grafana.replace(") IN (", ") NOT IN (");
        assert!(rewritten(&negated).ends_with("NOT IN ('grafana', 'public')"));
    }

    #[test]
    fn correlated_catalog_subqueries_inside_expressions_are_null() {
        let sql = "SELECT a.attname, CASE WHEN a.atthasdef THEN (SELECT pg_get_expr(d.adbin, \
                   d.adrelid) FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid) END AS \
                   def FROM pg_catalog.pg_attribute a";
        assert_eq!(
            rewritten(sql),
            "SELECT a.attname, CASE WHEN a.atthasdef THEN NULL END AS def FROM \
             pg_catalog.pg_attribute a"
        );
        // Fully qualified columns of the subquery's own tables are its own.
        let sql = "SELECT CASE WHEN true THEN (SELECT pg_catalog.pg_attrdef.adbin FROM \
                   pg_catalog.pg_attrdef WHERE pg_catalog.pg_attrdef.adnum = \
                   pg_catalog.pg_attribute.attnum) END FROM pg_catalog.pg_attribute";
        assert!(
            rewritten(sql).contains("THEN NULL END"),
            "{}",
            rewritten(sql)
        );
        // Left as written: uncorrelated, over Kiln's tables, or a whole select-list item.
        for sql in [
            "SELECT CASE WHEN true THEN (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE \
             n.nspname = 'public') END",
            "SELECT CASE WHEN true THEN (SELECT max(c.v) FROM cpu c WHERE c.host = t.host) END \
             FROM t",
            "SELECT (SELECT d.adbin FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid) \
             FROM pg_catalog.pg_attribute a",
        ] {
            assert_eq!(rewritten(sql), sql);
        }
    }

    #[test]
    fn user_generate_subscripts_and_show() {
        assert_eq!(rewritten("SELECT user"), "SELECT current_user");
        assert_eq!(
            rewritten("SELECT (information_schema._pg_expandarray(i.indkey)).n FROM i"),
            "SELECT (_pg_expandarray(i.indkey))['n'] FROM i"
        );
        assert_eq!(rewritten("SELECT t.a.b FROM t"), "SELECT t.a.b FROM t");
        assert_eq!(
            rewritten("SELECT \"user\" FROM t"),
            "SELECT \"user\" FROM t"
        );
        assert_eq!(
            rewritten("SELECT generate_subscripts(k, 1) AS ord FROM t"),
            "SELECT unnest(generate_series(array_lower(k, 1), array_upper(k, 1))) AS ord FROM t"
        );
        assert_eq!(
            rewritten("SHOW TimeZone"),
            "SELECT current_setting('timezone') AS \"TimeZone\""
        );
        assert_eq!(
            rewritten("SHOW TRANSACTION ISOLATION LEVEL"),
            "SELECT current_setting('transaction_isolation') AS \"transaction_isolation\""
        );
        assert_eq!(rewritten("SHOW ALL"), "SHOW ALL");
        assert_eq!(rewritten("SHOW TABLES"), "SHOW TABLES");
        // Text that does not parse goes on as written.
        assert_eq!(rewritten("SELEC 1"), "SELEC 1");
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;

    fn refused(sql: &str) -> Option<String> {
        rewrite(sql, &PgSettings::default()).err().map(|e| e.0)
    }

    #[test]
    fn sessions_read_and_set_their_own_settings_only() {
        for sql in [
            "SELECT 1",
            "EXPLAIN SELECT 1",
            "SHOW TIME ZONE",
            "SET application_name = 'x'",
            "SET datafusion.execution.target_partitions = 2",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "DECLARE c CURSOR FOR SELECT 1",
            "PREPARE p AS SELECT 1",
        ] {
            assert_eq!(refused(sql), None, "{sql}");
        }
        for (sql, says) in [
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY is not allowed"),
            ("COPY cpu TO STDOUT", "COPY is not allowed"),
            ("INSERT INTO cpu VALUES (1)", "INSERT, UPDATE and DELETE"),
            ("DELETE FROM cpu", "INSERT, UPDATE and DELETE"),
            ("CREATE SCHEMA s", "CREATE SCHEMA is not allowed"),
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE is not allowed"),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW is not allowed"),
            ("DROP TABLE cpu", "DROP TABLE is not allowed"),
            (
                "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/x'",
                "COPY is not allowed",
            ),
            ("SELECT 1; DROP TABLE cpu", "DROP TABLE"),
            (
                "SET datafusion.runtime.memory_limit = '100G'",
                "datafusion.runtime.memory_limit is not allowed",
            ),
            (
                "SET datafusion.catalog.default_catalog = 'x'",
                "is not allowed",
            ),
        ] {
            let message = refused(sql).unwrap_or_else(|| panic!("{sql} runs"));
            assert!(message.contains(says), "{sql}: {message}");
        }
    }
}
