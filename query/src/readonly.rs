//! Read-only enforcement, twice: an allow-list on the parsed statement (so a
//! write is refused as such, before planning can fail on something else),
//! and a walk of the planned logical plan, subqueries included, refusing any
//! DDL, DML, COPY or session statement that the allow-list let through
//! (`EXPLAIN ANALYZE INSERT ...` would otherwise run the insert).

use deltalake::datafusion::common::tree_node::TreeNodeRecursion;
use deltalake::datafusion::logical_expr::LogicalPlan;
use deltalake::datafusion::sql::parser::Statement;
use deltalake::datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::QueryError;

/// The first words of a statement, upper-cased, for the error message
/// ("DROP TABLE", "INSERT INTO", "COPY").
fn describe(stmt: &dyn std::fmt::Display) -> String {
    let text = stmt.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    let name = match words.as_slice() {
        [first, second]
            if matches!(
                first.to_ascii_uppercase().as_str(),
                "CREATE" | "DROP" | "ALTER" | "INSERT" | "TRUNCATE"
            ) && second.chars().all(|c| c.is_ascii_alphabetic()) =>
        {
            format!("{first} {second}")
        }
        [first, ..] => (*first).to_string(),
        [] => "an empty statement".to_string(),
    };
    name.to_ascii_uppercase()
}

/// Allows queries (`SELECT`, `VALUES`, `WITH`), `EXPLAIN` of an allowed
/// statement, `SHOW ...` and `DESCRIBE`; refuses everything else.
pub(crate) fn check_statement(stmt: &Statement) -> Result<(), QueryError> {
    match stmt {
        Statement::Statement(s) => check_sql_statement(s),
        Statement::Explain(e) => check_statement(&e.statement),
        Statement::CreateExternalTable(_) => {
            Err(QueryError::ReadOnly("CREATE EXTERNAL TABLE".into()))
        }
        Statement::CopyTo(_) => Err(QueryError::ReadOnly("COPY".into())),
        Statement::Reset(_) => Err(QueryError::ReadOnly("RESET".into())),
    }
}

fn check_sql_statement(s: &SqlStatement) -> Result<(), QueryError> {
    match s {
        SqlStatement::Query(_)
        | SqlStatement::ExplainTable { .. }
        | SqlStatement::ShowTables { .. }
        | SqlStatement::ShowColumns { .. }
        | SqlStatement::ShowVariable { .. }
        | SqlStatement::ShowFunctions { .. }
        | SqlStatement::ShowSchemas { .. }
        | SqlStatement::ShowDatabases { .. }
        | SqlStatement::ShowViews { .. } => Ok(()),
        SqlStatement::Explain { statement, .. } => check_sql_statement(statement),
        other => Err(QueryError::ReadOnly(describe(other))),
    }
}

/// Refuses a plan containing anything that changes state.
pub(crate) fn check_plan(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut refused: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        refused = match node {
            LogicalPlan::Ddl(ddl) => Some(ddl.name().to_string()),
            LogicalPlan::Dml(dml) => Some(dml.op.to_string()),
            LogicalPlan::Copy(_) => Some("COPY".to_string()),
            LogicalPlan::Statement(s) => Some(s.name().to_string()),
            _ => None,
        };
        Ok(if refused.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    match refused {
        Some(what) => Err(QueryError::ReadOnly(what)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::prelude::SessionContext;

    fn parse(sql: &str) -> Statement {
        let ctx = SessionContext::new();
        let state = ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        state.sql_to_statement(sql, &dialect).unwrap()
    }

    #[test]
    fn queries_pass_and_writes_are_named() {
        for ok in [
            "SELECT 1",
            "WITH a AS (SELECT 1 AS x) SELECT * FROM a",
            "VALUES (1), (2)",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
            "DESCRIBE bronze.ocpp_messages",
        ] {
            check_statement(&parse(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, name) in [
            ("DROP TABLE bronze.ocpp_messages", "DROP TABLE"),
            ("INSERT INTO t VALUES (1)", "INSERT INTO"),
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE"),
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("DELETE FROM t", "DELETE"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/tmp/x'",
                "CREATE EXTERNAL TABLE",
            ),
            ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "INSERT INTO"),
        ] {
            match check_statement(&parse(bad)) {
                Err(QueryError::ReadOnly(what)) => assert_eq!(what, name, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn plans_that_write_are_refused() {
        let ctx = SessionContext::new();
        let ok = ctx.state().create_logical_plan("SELECT 1").await.unwrap();
        check_plan(&ok).unwrap();
        let ddl = ctx
            .state()
            .create_logical_plan("CREATE VIEW v AS SELECT 1")
            .await
            .unwrap();
        assert!(matches!(check_plan(&ddl), Err(QueryError::ReadOnly(_))));
        let copy = ctx
            .state()
            .create_logical_plan("COPY (SELECT 1) TO '/tmp/never-written.csv'")
            .await
            .unwrap();
        assert!(matches!(check_plan(&copy), Err(QueryError::ReadOnly(w)) if w == "COPY"));
    }
}
