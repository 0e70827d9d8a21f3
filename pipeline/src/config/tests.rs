use super::*;

fn load(dir: &Path, text: &str) -> Result<Config, LoadError> {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/p.toml"),
        "table = \"public.t\"\ntarget = \"t\"\nsubject = \"id\"\ntoken_domain = \"d\"\n[columns.id]\naction = \"tokenize\"\n",
    )
    .unwrap();
    let file = dir.join("sluice.toml");
    std::fs::write(&file, text).unwrap();
    Config::load(&file)
}

const HEAD: &str = "name = \"p\"\npolicies = [\"policies\"]\n[lake]\nroot = \"lake\"\n[keys]\nstore = \"k.db\"\nmaster_key_env = \"K\"\n";

#[test]
fn a_column_another_policy_names_as_its_subject_is_never_kept() {
    let dir = tempfile::tempdir().unwrap();
    let orders = "table = \"public.orders\"\ntarget = \"orders\"\nsubject = \"customer\"\ntoken_domain = \"d\"\n[columns.customer]\naction = \"tokenize\"\n[columns.id]\naction = \"keep\"\ntype = \"int64\"\n";
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/q.toml"), orders).unwrap();
    let e = load(dir.path(), &format!("{HEAD}[source]\nkind = \"file\"\npath = \"e\"\n")).unwrap_err();
    let LoadError::Invalid(e) = e else { panic!("{e}") };
    assert!(
        e.file.ends_with("q.toml") && e.line == 7 && e.field == "columns.id.action",
        "{e}"
    );
    assert!(e.message.contains("subject column of `public.t`"), "{e}");
    // In another token domain the same name is another kind of id.
    std::fs::write(
        dir.path().join("policies/q.toml"),
        orders.replace("\"d\"", "\"orders\""),
    )
    .unwrap();
    load(dir.path(), &format!("{HEAD}[source]\nkind = \"file\"\npath = \"e\"\n")).unwrap();
}

#[test]
fn the_memory_budget_is_shared_out_and_a_tiny_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    let config = load(
        dir.path(),
        &format!("{HEAD}{source}[workers]\nthreads = 2\nmemory_mb = 256\n"),
    )
    .unwrap();
    let plan = config.memory();
    assert_eq!(plan.key_store, 64 << 20);
    assert_eq!(plan.buffered, 64 << 20, "a quarter, under [batch] max_bytes");
    assert_eq!(plan.tokens_per_thread, 8 << 20);
    let e = load(dir.path(), &format!("{HEAD}{source}[workers]\nmemory_mb = 8\n")).unwrap_err();
    let LoadError::Invalid(e) = e else { panic!("{e}") };
    assert_eq!((e.line, e.field.as_str()), (12, "workers.memory_mb"), "{e}");
    assert!(e.message.contains("at least 64"), "{e}");
    // The line is the key's in `[workers]`, not a comment that mentions it earlier.
    let commented = format!("# memory_mb: see [workers]\n{HEAD}{source}[workers]\nmemory_mb = 8\n");
    let LoadError::Invalid(e) = load(dir.path(), &commented).unwrap_err() else {
        panic!("a config error")
    };
    assert_eq!(e.line, 13, "{e}");
}

#[test]
fn kafka_source_and_publish_are_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{HEAD}[source]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\", \"^x.*\"]\nstart = \"latest\"\ntls = {{ ca_file = \"ca.pem\" }}\nsasl = {{ mechanism = \"SCRAM-SHA-512\", username = \"sluice\", password_env = \"KAFKA_PASSWORD\" }}\n[source.properties]\n\"fetch.max.bytes\" = \"1048576\"\n[publish]\nkind = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"out\"\ntls = {{ cert_file = \"c.pem\", key_file = \"c.key\" }}\n"
    );
    let config = load(dir.path(), &text).unwrap();
    let SourceConfig::Kafka(k) = &config.source else {
        panic!("not a kafka source")
    };
    assert_eq!(k.topics, ["t", "^x.*"]);
    assert_eq!(k.start_at, StartAt::Latest);
    assert_eq!(k.settings.properties["fetch.max.bytes"], "1048576");
    let tls = k.settings.security.tls.as_ref().unwrap();
    assert_eq!(tls.ca_file.as_deref(), Some(dir.path().join("ca.pem").as_path()));
    let sasl = k.settings.security.sasl.as_ref().unwrap();
    assert_eq!(
        (sasl.mechanism, sasl.username.as_str()),
        (SaslMechanism::ScramSha512, "sluice")
    );
    assert!(matches!(&sasl.password, PasswordSource::Env(v) if v == "KAFKA_PASSWORD"));
    let Some(PublishConfig::Kafka { topic, settings }) = &config.publish else {
        panic!("not a kafka publisher")
    };
    assert_eq!(topic, "out");
    assert_eq!(settings.security.section, "publish");
    assert!(settings.security.tls.as_ref().unwrap().key_file.is_some());
    assert_eq!(config.sink_locations().len(), 3);
}

#[test]
fn security_is_set_by_its_own_keys_and_never_holds_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"kafka\"\nbrokers = \"b\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n";
    for (extra, expected) in [
        (
            "[source.properties]\n\"sasl.password\" = \"hunter2-secret\"\n",
            "source.properties: `sasl.password` is set by sluice and cannot be overridden",
        ),
        (
            "sasl = { mechanism = \"GSSAPI\", username = \"u\", password_env = \"P\" }\n",
            "source.sasl.mechanism: unknown mechanism `GSSAPI`: one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            "sasl = { mechanism = \"PLAIN\", username = \"u\" }\n",
            "source.sasl: name the password with password_env or password_file (one of them; never the password itself)",
        ),
        (
            "sasl = { mechanism = \"PLAIN\", username = \"u\", password = \"hunter2-secret\" }\n",
            "unknown field `password`",
        ),
        ("tls = { cert_file = \"c.pem\" }\n", "source.tls: mutual TLS needs both cert_file and key_file"),
        ("format = \"avro\"\n", "source.schema_registry: \"avro\" needs [source.schema_registry] url"),
        (
            "format = \"avro\"\nschema_registry = { url = \"http://r\", username_env = \"U\" }\n",
            "source.schema_registry: basic auth needs both username_env and password_env",
        ),
        (
            "format = \"avro\"\nschema_registry = { url = \"https://u:hunter2-secret@r/\" }\n",
            "source.schema_registry.url: credentials belong in username_env/password_env or token_env, not in the URL",
        ),
    ] {
        let err = load(dir.path(), &format!("{HEAD}{source}{extra}")).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    let err = load(
        dir.path(),
        &format!("{HEAD}[source]\nkind = \"file\"\npath = \"e\"\nformat = \"avro\"\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("source.format: \"avro\" is read from Kafka sources only"),
        "{err}"
    );
}

#[test]
fn a_missing_or_wrong_kafka_setting_names_its_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{HEAD}[source]\nkind = \"kafka\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n");
    let err = load(dir.path(), &text).unwrap_err().to_string();
    assert!(
        err.ends_with("sluice.toml:9: source.brokers: required for source kind `kafka`"),
        "{err}"
    );
    let text = format!(
        "{HEAD}[source]\nkind = \"kafka\"\nbrokers = \"b\"\ngroup_id = \"g\"\ntopics = [\"t\"]\nstart = \"oldest\"\n"
    );
    let err = load(dir.path(), &text).unwrap_err().to_string();
    assert!(
        err.ends_with("sluice.toml:13: source.start: `oldest`: expected `earliest` or `latest`"),
        "{err}"
    );
}

#[test]
fn the_lake_format_and_iceberg_catalog_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let with_lake = |lake: &str| HEAD.replace("[lake]\nroot = \"lake\"\n", &format!("[lake]\nroot = \"lake\"\n{lake}"));
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    // The error a config with these `[lake]` lines is refused with.
    let refused = |lake: &str| {
        load(dir.path(), &format!("{}{source}", with_lake(lake)))
            .unwrap_err()
            .to_string()
    };
    let err = refused("format = \"parquet\"\n");
    assert!(
        err.ends_with("sluice.toml:5: lake.format: `parquet`: expected `delta`, `iceberg` or `both`"),
        "{err}"
    );
    let err = refused("format = \"both\"\n[lake.iceberg]\ncatalog = \"hive\"\n");
    assert!(
        err.ends_with("sluice.toml:7: lake.iceberg.catalog: unknown catalog `hive`: expected `sql` or `rest`"),
        "{err}"
    );
    let err = refused("format = \"iceberg\"\n[lake.iceberg]\ncatalog = \"rest\"\n");
    assert!(
        err.ends_with("lake.iceberg.uri: required for `catalog = \"rest\"`"),
        "{err}"
    );
    // A REST catalog's credentials, read from the environment, are used and never shown.
    std::env::set_var("SLUICE_TEST_ICEBERG_TOKEN", "iceberg-t0ken");
    let text = format!(
        "{}{source}",
        with_lake("format = \"iceberg\"\n[lake.iceberg]\ncatalog = \"rest\"\nuri = \"http://c\"\nproperties = { prefix = \"p1\" }\nproperties_env = { token = \"SLUICE_TEST_ICEBERG_TOKEN\" }\n")
    );
    let config = load(dir.path(), &text).unwrap();
    let Some(IcebergLocation {
        catalog: CatalogSettings::Rest { properties, .. },
        ..
    }) = &config.iceberg
    else {
        panic!("a REST catalog")
    };
    assert_eq!(properties.get("token").map(String::as_str), Some("iceberg-t0ken"));
    assert!(
        !format!("{config:?}").contains("iceberg-t0ken"),
        "no credential in Debug output"
    );
    // A header value the HTTP client would refuse (and print) is refused by name.
    std::env::set_var("SLUICE_TEST_ICEBERG_HEADER", "Bearer s3cr3t\n");
    let err = refused("format = \"iceberg\"\n[lake.iceberg]\ncatalog = \"rest\"\nuri = \"http://c\"\nproperties_env = { \"header.Authorization\" = \"SLUICE_TEST_ICEBERG_HEADER\" }\n");
    assert!(
        err.contains("lake.iceberg.properties.header.Authorization: the value holds a control character"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t"), "{err}");
    let err = refused("[lake.iceberg]\nnamespace = \"x\"\n");
    assert!(
        err.ends_with("lake.iceberg: set, but `lake.format` does not include `iceberg`"),
        "{err}"
    );

    let config = load(dir.path(), &format!("{}{source}", with_lake("format = \"both\"\n"))).unwrap();
    // Per policy one table per format, then the vault and the quarantine (always Delta).
    let locations = config.sink_locations();
    assert_eq!(locations.len(), 4);
    assert!(
        matches!(&locations[0], TableLocation::Delta(p) if p.local().is_some_and(|p| p.ends_with("lake/tables/t")))
    );
    assert!(
        matches!(&locations[1], TableLocation::Iceberg { location, table } if table == "t" && location.namespace == "p"
            && location.catalog == CatalogSettings::Sql { database: dir.path().join("lake/iceberg/catalog.db"), warehouse: LakePath::Local(dir.path().join("lake/iceberg/warehouse")) })
    );
}

#[test]
fn s3_locations_take_their_own_options_and_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    let with_lake = |lake: &str| {
        format!(
            "{}{source}",
            HEAD.replace(
                "[lake]\nroot = \"lake\"\n",
                &format!("[lake]\nroot = \"s3://b/lake\"\n{lake}")
            )
        )
    };
    std::env::set_var("SLUICE_TEST_VAULT_ID", "vault-id");
    std::env::set_var("SLUICE_TEST_VAULT_SECRET", "vault-secret");
    let config = load(
        dir.path(),
        &with_lake(
            "vault = \"s3://pii/v\"\n[lake.s3]\nendpoint = \"http://h:9000\"\nallow_http = true\n[lake.vault_s3]\nregion = \"eu-west-1\"\naccess_key_id_env = \"SLUICE_TEST_VAULT_ID\"\nsecret_access_key_env = \"SLUICE_TEST_VAULT_SECRET\"\n",
        ),
    )
    .unwrap();
    let LakePath::Object { url, options } = &config.vault_path else {
        panic!("the vault is on S3")
    };
    assert_eq!(url.as_str(), "s3://pii/v");
    assert_eq!(options.get("aws_access_key_id"), Some("vault-id"));
    assert_eq!(options.get("aws_endpoint"), None, "the vault's own options only");
    let LakePath::Object { url, options } = &config.tables_root else {
        panic!("the tables are on S3")
    };
    assert_eq!(url.as_str(), "s3://b/lake/tables");
    assert_eq!(options.get("aws_endpoint"), Some("http://h:9000"));
    assert_eq!(options.get("aws_access_key_id"), None, "the standard AWS chain");
    assert!(
        !format!("{config:?}").contains("vault-secret"),
        "no secret in Debug output"
    );

    let cases = [
        (
            "[lake.s3]\nendpont = \"x\"\n",
            "sluice.toml:6: endpont: unknown field `endpont`",
        ),
        (
            "[lake.s3]\naccess_key_id_env = \"SLUICE_TEST_UNSET_VARIABLE\"\nsecret_access_key_env = \"SLUICE_TEST_VAULT_SECRET\"\n",
            "sluice.toml:6: lake.s3.access_key_id_env: environment variable `SLUICE_TEST_UNSET_VARIABLE` is not set",
        ),
        (
            "format = \"iceberg\"\n",
            "sluice.toml:5: lake.iceberg.uri: required with an s3:// lake root",
        ),
    ];
    for (lake, expected) in cases {
        let err = load(dir.path(), &with_lake(lake)).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}\nexpected: {expected}");
    }
}

#[test]
fn a_postgres_password_is_read_when_a_run_starts_and_an_unset_named_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let head = "name = \"p\"\npolicies = [\"policies\"]\n[lake]\nroot = \"lake\"\n";
    let pg_source = |var: &str| {
        format!("[source]\nkind = \"postgres\"\nuser = \"u\"\ndatabase = \"d\"\npassword_env = \"{var}\"\n")
    };
    let pg_keys = |var: &str| {
        format!("[keys]\nkind = \"postgres\"\nuser = \"u\"\ndatabase = \"d\"\nmaster_key_env = \"K\"\npassword_env = \"{var}\"\n")
    };
    // `sluice check` reads no secret: an unset variable is found when a run starts.
    let unset = "SLUICE_TEST_UNSET_PG_PASSWORD";
    let config = load(dir.path(), &format!("{head}{}{}", pg_keys(unset), pg_source(unset))).unwrap();
    let SourceConfig::Postgres(source) = &config.source else {
        panic!("a PostgreSQL source")
    };
    assert_eq!(
        source.password().unwrap_err().to_string(),
        "environment variable SLUICE_TEST_UNSET_PG_PASSWORD (named by source.password_env) is not set"
    );
    let KeyStoreLocation::Postgres(keys) = &config.key_store else {
        panic!("a PostgreSQL key store")
    };
    assert_eq!(keys.password_env.as_deref(), Some(unset));

    std::env::set_var("SLUICE_TEST_PG_PASSWORD", "pg-s3cret");
    let config = load(
        dir.path(),
        &format!(
            "{head}{}{}",
            pg_keys("SLUICE_TEST_PG_PASSWORD"),
            pg_source("SLUICE_TEST_PG_PASSWORD")
        ),
    )
    .unwrap();
    let SourceConfig::Postgres(source) = &config.source else {
        panic!("a PostgreSQL source")
    };
    let password = source.password().unwrap().unwrap();
    assert_eq!(password.expose(), "pg-s3cret");
    assert!(
        !format!("{password:?} {config:?}").contains("pg-s3cret"),
        "no password in Debug output"
    );
}

#[test]
fn an_aggregate_names_its_errors_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    let agg = |body: &str| format!("{HEAD}{source}[[aggregates]]\nname = \"a\"\nfrom = \"t\"\n{body}");
    let cases = [
        (
            "dimensions = [\"id_token\"]\nmeasures = [{fn=\"count\"}]\n",
            "sluice.toml:14: aggregates.dimensions: `id_token` is tokenize",
        ),
        (
            "dimensions = [\"nope\"]\nmeasures = [{fn=\"count\"}]\n",
            "sluice.toml:14: aggregates.dimensions: `nope` is not an output column of policy `public.t`",
        ),
        (
            "dimensions = []\nmeasures = [{fn=\"max\", column=\"x\"}]\n",
            "sluice.toml:15: aggregates.measures.fn: unknown measure `max`",
        ),
        (
            "dimensions = []\nmeasures = [{fn=\"sum\"}]\n",
            "sluice.toml:15: aggregates.measures.column: required for `sum` and `avg`",
        ),
        (
            "dimensions = []\nmeasures = [{fn=\"count\"}]\nk_anonymity = 1\n",
            "sluice.toml:16: aggregates.k_anonymity: must be at least 2",
        ),
        (
            "dimensions = []\nmeasures = []\n",
            "sluice.toml:15: aggregates.measures: name at least one measure",
        ),
    ];
    for (body, want) in cases {
        let err = load(dir.path(), &agg(body)).unwrap_err().to_string();
        assert!(err.contains(want), "{err}\nwanted: {want}");
    }
    let config = load(
        dir.path(),
        &agg("dimensions = []\nmeasures = [{fn=\"count\"}, {fn=\"count_distinct_subjects\"}]\n"),
    )
    .unwrap();
    let a = &config.aggregates[0];
    assert_eq!((a.k, a.on_suppressed), (11, Suppression::Drop));
    assert_eq!(
        a.measures.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["count", "distinct_subjects"]
    );
}

#[test]
fn current_tables_get_their_own_sinks_and_refuse_a_name_clash() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    let keyed = "table = \"public.a\"\ntarget = \"a\"\nsubject = \"id\"\ntoken_domain = \"d\"\nkey = [\"id\"]\ncurrent = true\n[columns.id]\naction = \"tokenize\"\n";
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/a.toml"), keyed).unwrap();
    let config = load(dir.path(), &format!("{HEAD}{source}")).unwrap();
    let names: Vec<String> = config.sink_locations().iter().map(|l| l.describe()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names[2].ends_with("tables/a_current"), "{names:?}");
    let settings = config.current_settings(&config.policies[0]);
    assert_eq!(settings.key, ["_subject"]);
    assert_eq!(
        settings.max_lag,
        std::time::Duration::from_millis(defaults::CURRENT_MAX_LAG_MS)
    );

    // Another policy's table of the same name.
    std::fs::write(
        dir.path().join("policies/b.toml"),
        keyed
            .replace("public.a", "public.b")
            .replace("target = \"a\"", "target = \"a_current\"")
            .replace("key = [\"id\"]\ncurrent = true\n", ""),
    )
    .unwrap();
    let err = load(dir.path(), &format!("{HEAD}{source}")).unwrap_err().to_string();
    assert!(
        err.contains("keeps a current table `a_current`, and another policy writes a table of that name"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("policies/b.toml")).unwrap();

    // A REST catalog keeps current tables too (rewrites are committed through it).
    let rest = HEAD.replace(
        "root = \"lake\"\n",
        "root = \"lake\"\nformat = \"both\"\n[lake.iceberg]\ncatalog = \"rest\"\nuri = \"http://c\"\n",
    );
    let config = load(dir.path(), &format!("{rest}{source}")).unwrap();
    let names: Vec<String> = config.sink_locations().iter().map(|l| l.describe()).collect();
    assert!(names.iter().any(|n| n == "sluice.p.a_current"), "{names:?}");
}

#[test]
fn iceberg_on_s3_keeps_its_sql_catalog_local_and_its_warehouse_beside_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/a.toml"),
        "table = \"public.a\"\ntarget = \"a\"\nsubject = \"id\"\ntoken_domain = \"d\"\n[columns.id]\naction = \"tokenize\"\n",
    )
    .unwrap();
    let on_s3 = |iceberg: &str| {
        HEAD.replace(
            "root = \"lake\"\n",
            &format!("root = \"s3://bucket/lake\"\nformat = \"iceberg\"\n[lake.s3]\nendpoint = \"http://127.0.0.1:9\"\nregion = \"eu-west-1\"\n{iceberg}"),
        )
    };
    // The SQL catalog is a SQLite file: on an S3 lake its path must be given.
    let err = load(dir.path(), &format!("{}{source}", on_s3("")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sluice.toml:5: lake.iceberg.uri: required with an s3:// lake root"),
        "{err}"
    );
    let config = load(
        dir.path(),
        &format!("{}{source}", on_s3("[lake.iceberg]\nuri = \"catalog.db\"\n")),
    )
    .unwrap();
    let Some(iceberg) = &config.iceberg else {
        panic!("iceberg")
    };
    let CatalogSettings::Sql { database, warehouse } = &iceberg.catalog else {
        panic!("sql")
    };
    assert_eq!(database, &dir.path().join("catalog.db"));
    assert_eq!(warehouse.to_string(), "s3://bucket/lake/iceberg/warehouse");
    let LakePath::Object { options, .. } = warehouse else {
        panic!("s3")
    };
    assert_eq!(options.get("aws_region"), Some("eu-west-1"));
    // A warehouse of its own, in another bucket, with the lake's S3 settings.
    let config = load(
        dir.path(),
        &format!(
            "{}{source}",
            on_s3("[lake.iceberg]\nuri = \"c.db\"\nwarehouse = \"s3://other/wh\"\n")
        ),
    )
    .unwrap();
    let Some(CatalogSettings::Sql { warehouse, .. }) = config.iceberg.as_ref().map(|i| &i.catalog) else {
        panic!("sql")
    };
    assert_eq!(warehouse.to_string(), "s3://other/wh");
}

#[test]
fn governance_settings_are_checked_with_their_line_and_the_policies_classes_against_them() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    let config = load(dir.path(), &format!("{HEAD}{source}")).unwrap();
    assert_eq!(config.governance.reveal, RevealConfig::default());
    assert_eq!(
        config.governance.classes.len(),
        sluice_transforms::policy::CLASSES.len()
    );
    assert_eq!(config.retention, RetentionConfig::default());

    let e = load(
        dir.path(),
        &format!("{HEAD}{source}[governance.reveal]\napprovals = 0\n"),
    )
    .unwrap_err();
    let LoadError::Invalid(e) = e else { panic!("{e}") };
    assert_eq!((e.field.as_str(), e.line), ("governance.reveal.approvals", 12), "{e}");

    let classed = "table = \"public.t\"\ntarget = \"t\"\nsubject = \"id\"\ntoken_domain = \"d\"\n[columns.id]\naction = \"tokenize\"\n[columns.x]\naction = \"keep\"\ntype = \"int64\"\nclass = \"criminal_offence\"\n";
    std::fs::write(dir.path().join("policies/p.toml"), classed).unwrap();
    let file = dir.path().join("sluice.toml");
    std::fs::write(&file, format!("{HEAD}{source}")).unwrap();
    let LoadError::Invalid(e) = Config::load(&file).unwrap_err() else {
        panic!()
    };
    assert!(
        e.file.ends_with("p.toml") && e.line == 10 && e.field == "columns.x.class",
        "{e}"
    );
    std::fs::write(
        &file,
        format!("{HEAD}{source}[governance]\nclasses = [\"criminal_offence\"]\n"),
    )
    .unwrap();
    let config = Config::load(&file).unwrap();
    assert!(config.governance.classes.contains(&"criminal_offence".to_string()));
}

#[test]
fn retention_settings_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let source = "[source]\nkind = \"file\"\npath = \"e\"\n";
    for (setting, field) in [
        ("interval_ms = 5", "retention.interval_ms"),
        ("quarantine_days = 0", "retention.quarantine_days"),
    ] {
        let e = load(
            dir.path(),
            &format!("{HEAD}{source}[retention]\nshred_keys = true\n{setting}\n"),
        )
        .unwrap_err();
        let LoadError::Invalid(e) = e else { panic!("{e}") };
        assert_eq!((e.field.as_str(), e.line), (field, 13), "{e}");
    }
    let config = load(
        dir.path(),
        &format!("{HEAD}{source}[retention]\ninterval_ms = 0\nquarantine_days = 30\n"),
    )
    .unwrap();
    assert_eq!(config.retention.quarantine_days, Some(30));
}
