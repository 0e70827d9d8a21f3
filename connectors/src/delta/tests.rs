use super::*;
use arrow_array::{Int64Array, StringArray};
use arrow_schema::{Field, Schema};
use std::sync::Arc;

#[test]
fn a_nullable_column_appended_by_a_newer_schema_is_added_and_its_values_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let location = LakePath::parse("t", dir.path(), Default::default()).unwrap();
    let old = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let new = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("_source_db", DataType::Utf8, true),
    ]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let position = |offset| SourcePosition {
        stream: "s".into(),
        offset,
    };
    rt.block_on(async {
        let stats = ["id".to_string(), "_source_db".to_string()];
        let mut sink = DeltaSink::open_or_create(&location, "t", "p", old.clone(), &[], &stats[..1], None)
            .await
            .unwrap();
        sink.write(RecordBatch::try_new(old.clone(), vec![Arc::new(Int64Array::from(vec![1]))]).unwrap())
            .await
            .unwrap();
        sink.commit(&[position(1)], &[]).await.unwrap();
        assert!(sink.column_values_in_stats("_source_db").unwrap().is_empty());

        let mut sink = DeltaSink::open_or_create(&location, "t", "p", new.clone(), &[], &stats, None)
            .await
            .unwrap();
        let batch = RecordBatch::try_new(
            new.clone(),
            vec![
                Arc::new(Int64Array::from(vec![2])),
                Arc::new(StringArray::from(vec!["crm"])),
            ],
        )
        .unwrap();
        assert_eq!(sink.committed("s").await.unwrap(), Some(1));
        sink.write(batch).await.unwrap();
        sink.commit(&[position(2)], &[]).await.unwrap();
        let sink = DeltaSink::open_or_create(&location, "t", "p", new.clone(), &[], &stats, None)
            .await
            .unwrap();
        assert_eq!(
            sink.column_values_in_stats("_source_db").unwrap(),
            vec!["crm".to_string()]
        );
        // A column removed, or one added in the middle, is still refused.
        assert!(
            DeltaSink::open_or_create(&location, "t", "p", old, &[], &stats[..1], None)
                .await
                .is_err()
        );
    });
}

#[test]
fn a_column_of_tokens_gives_up_its_dictionary_early_and_a_repeating_column_keeps_one() {
    use deltalake::parquet::arrow::ArrowWriter;
    use deltalake::parquet::basic::Encoding;
    use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer_token", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
    ]));
    let rows = 100_000;
    // Random-looking like real tokens (so the dictionary page does not compress away).
    let mix = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0xD6E8_FEB8_6659_FD93;
    let tokens: Vec<String> = (0..rows as u64)
        .map(|i| format!("{:016x}{:016x}", mix(i), mix(!i)))
        .collect();
    let statuses: Vec<&str> = (0..rows).map(|i| ["open", "closed", "arrears"][i % 3]).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(tokens)),
            Arc::new(StringArray::from(statuses)),
        ],
    )
    .unwrap();
    let mut file = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut file, schema.clone(), Some(writer_properties(&schema))).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let reader = SerializedFileReader::new(bytes::Bytes::from(file)).unwrap();
    let chunk = reader.metadata().row_group(0).column(0);
    // The dictionary page is what was interned before giving up (and held in memory until
    // the commit): about the lake's limit, not the parquet crate's default mebibyte.
    let dictionary_bytes = chunk.data_page_offset() - chunk.dictionary_page_offset().unwrap();
    assert!(
        dictionary_bytes <= 128 << 10,
        "{dictionary_bytes} bytes of dictionary for values that never repeat"
    );
    let status = reader.metadata().row_group(0).column(1);
    assert!(status.encodings().any(|e| e == Encoding::RLE_DICTIONARY));
    // Dictionary indices (2 bits a row), not the strings again (~10 bytes a row).
    assert!(
        status.uncompressed_size() < 100_000,
        "the repeating column fell back to plain: {} bytes",
        status.uncompressed_size()
    );
}
