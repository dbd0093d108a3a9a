//! Query results in the formats analysts' tools read: a terminal table,
//! CSV (with a header), JSON (an array of row objects keyed by column name,
//! nulls kept so every row has every column), an Arrow IPC stream (pandas,
//! Polars, DuckDB read it without conversion) and Parquet.

use std::sync::Arc;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::ipc::writer::StreamWriter;
use deltalake::arrow::json::writer::JsonArray;
use deltalake::parquet::arrow::ArrowWriter;

use crate::{QueryError, QueryResult};

fn arrow_err(e: ArrowError) -> QueryError {
    QueryError::Internal(format!("rendering the result: {e}"))
}

/// The batches to write: at least one, so writers that emit a header or a
/// schema on their first batch do so for an empty result too.
fn batches_or_empty(result: &QueryResult) -> Vec<RecordBatch> {
    if result.batches.is_empty() {
        vec![RecordBatch::new_empty(result.schema.clone())]
    } else {
        result.batches.clone()
    }
}

/// A boxed table for the terminal (`csms query`), with the column names even
/// when there are no rows.
pub fn render_table(result: &QueryResult) -> Result<String, QueryError> {
    deltalake::arrow::util::pretty::pretty_format_batches_with_schema(
        result.schema.clone(),
        &result.batches,
    )
    .map(|t| t.to_string())
    .map_err(arrow_err)
}

/// CSV with a header line.
pub fn render_csv(result: &QueryResult) -> Result<Vec<u8>, QueryError> {
    let mut writer = deltalake::arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(Vec::new());
    for batch in batches_or_empty(result) {
        writer.write(&batch).map_err(arrow_err)?;
    }
    Ok(writer.into_inner())
}

/// A JSON array of objects, one per row, keyed by column name.
pub fn render_json(result: &QueryResult) -> Result<Vec<u8>, QueryError> {
    let mut writer = deltalake::arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, JsonArray>(Vec::new());
    for batch in &result.batches {
        writer.write(batch).map_err(arrow_err)?;
    }
    writer.finish().map_err(arrow_err)?;
    Ok(writer.into_inner())
}

/// An Arrow IPC stream (`application/vnd.apache.arrow.stream`).
pub fn render_arrow_ipc(result: &QueryResult) -> Result<Vec<u8>, QueryError> {
    let mut writer = StreamWriter::try_new(Vec::new(), &result.schema).map_err(arrow_err)?;
    for batch in &result.batches {
        writer.write(batch).map_err(arrow_err)?;
    }
    writer.finish().map_err(arrow_err)?;
    writer.into_inner().map_err(arrow_err)
}

/// One Parquet file (`application/vnd.apache.parquet`).
pub fn render_parquet(result: &QueryResult) -> Result<Vec<u8>, QueryError> {
    let parquet_err = |e: deltalake::parquet::errors::ParquetError| {
        QueryError::Internal(format!("rendering the result as Parquet: {e}"))
    };
    let mut writer =
        ArrowWriter::try_new(Vec::new(), Arc::clone(&result.schema), None).map_err(parquet_err)?;
    for batch in &result.batches {
        writer.write(batch).map_err(parquet_err)?;
    }
    writer.into_inner().map_err(parquet_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Int64Array, StringArray};
    use deltalake::arrow::datatypes::{DataType, Field, Schema};

    fn sample() -> QueryResult {
        let schema = Arc::new(Schema::new(vec![
            Field::new("station_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["CP1", "CP,2"])),
                Arc::new(Int64Array::from(vec![Some(3), None])),
            ],
        )
        .unwrap();
        QueryResult {
            schema,
            batches: vec![batch],
        }
    }

    fn empty() -> QueryResult {
        let s = sample();
        QueryResult {
            schema: s.schema,
            batches: vec![],
        }
    }

    #[test]
    fn json_rows_keep_nulls_and_names() {
        let v: serde_json::Value =
            serde_json::from_slice(&render_json(&sample()).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"station_id": "CP1", "n": 3}, {"station_id": "CP,2", "n": null}])
        );
        let v: serde_json::Value = serde_json::from_slice(&render_json(&empty()).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!([]));
    }

    #[test]
    fn csv_has_a_header_and_quotes() {
        let text = String::from_utf8(render_csv(&sample()).unwrap()).unwrap();
        assert_eq!(text, "station_id,n\nCP1,3\n\"CP,2\",\n");
        let text = String::from_utf8(render_csv(&empty()).unwrap()).unwrap();
        assert_eq!(text, "station_id,n\n");
    }

    #[test]
    fn table_shows_headers_even_without_rows() {
        let t = render_table(&sample()).unwrap();
        assert!(t.contains("| station_id | n |"), "{t}");
        assert!(t.contains("| CP,2       |   |"), "{t}");
        let t = render_table(&empty()).unwrap();
        assert!(t.contains("station_id"), "{t}");
    }

    #[test]
    fn arrow_ipc_and_parquet_round_trip() {
        use deltalake::arrow::ipc::reader::StreamReader;
        use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

        let bytes = render_arrow_ipc(&sample()).unwrap();
        let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches, sample().batches);

        let bytes = render_parquet(&sample()).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        assert_eq!(batches[0].schema().field(0).name(), "station_id");
    }
}
