use super::*;

const CUSTOMERS: &str = include_str!("../../../fixtures/test-policies/customers-parser.toml");

fn parse(text: &str) -> Result<Policy, ConfigError> {
    Policy::from_toml(Path::new("customers.toml"), text)
}

#[test]
fn the_documented_example_parses_into_the_expected_outputs() {
    let p = parse(CUSTOMERS).unwrap();
    let names: Vec<String> = p.output_columns().into_iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "id_token",
            "has_email",
            "email_domain",
            "date_of_birth_age_band",
            "postcode_area",
            "national_id_enc",
            "balance"
        ]
    );
    assert!(p.needs_keys());
    assert_eq!(p.source_columns().len(), 7);
}

#[test]
fn errors_name_file_line_and_field() {
    let bad = CUSTOMERS.replace("type = \"int64\"", "type = \"int65\"");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.field, "columns.balance.type");
    assert_eq!(e.line, 30);
    assert!(
        e.to_string()
            .starts_with("customers.toml:30: columns.balance.type: unknown type `int65`"),
        "{e}"
    );

    let e = parse(&CUSTOMERS.replace("action = \"drop\"", "action = \"shred\"")).unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("columns.notes.action", 33));

    let e = parse(&CUSTOMERS.replace("length = 3", "lenght = 3")).unwrap_err();
    assert_eq!(e.field, "lenght");
    assert!(e.line >= 20 && e.line <= 25, "{e}");

    let e = parse(&CUSTOMERS.replace(
        "bands = [18, 25, 35, 45, 55, 65]",
        "bands = [18, 25, 35, 45, 55, 65]\nunit = \"weeks\"",
    ))
    .unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("columns.date_of_birth.unit", 18));
    assert!(e.message.contains("one of days, ms, us, ns"), "{e}");

    let e = parse(&CUSTOMERS.replace("fn = \"email_domain\"", "fn = \"domain\"")).unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("columns.email.derive.fn", 12));
}

#[test]
fn erasure_mode_is_delete_unless_anonymize_is_chosen() {
    assert_eq!(parse(CUSTOMERS).unwrap().erasure, Erasure::Delete);
    let anonymize = format!("{CUSTOMERS}\n[erasure]\nmode = \"anonymize\"\nblank = [\"postcode_area\"]\n");
    let policy = parse(&anonymize).unwrap();
    assert_eq!(
        policy.erasure,
        Erasure::Anonymize {
            also_blank: vec!["postcode_area".into()]
        }
    );
    assert_eq!(
        policy.linking_columns(),
        vec!["id_token", "national_id_enc", "postcode_area"]
    );
    let lines = CUSTOMERS.lines().count();
    let e = parse(&format!(
        "{CUSTOMERS}\n[erasure]\nmode = \"anonymize\"\nblank = [\"email\"]\n"
    ))
    .unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("erasure.blank", lines + 4));
    assert!(e.message.contains("not an output column"), "{e}");
    let times = parse(&format!(
        "{CUSTOMERS}\n[erasure]\nmode = \"anonymize\"\nblank = [\"_source_ts\", \"_ingested_at\"]\n"
    ))
    .unwrap();
    assert!(times.linking_columns().contains(&"_source_ts".to_string()));
    let e = parse(&format!("{CUSTOMERS}\n[erasure]\nmode = \"shred\"\n")).unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("erasure.mode", lines + 3));
}

#[test]
fn the_subject_column_is_never_kept_or_generalized() {
    for action in [
        "action = \"keep\"\ntype = \"string\"",
        "action = \"generalize\"\nfn = \"prefix\"\nlength = 2",
    ] {
        let text = CUSTOMERS.replace(
            "[columns.id]\naction = \"tokenize\"",
            &format!("[columns.id]\n{action}"),
        );
        assert_ne!(text, CUSTOMERS);
        let e = parse(&text).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("columns.id.action", 7), "{e}");
        assert!(e.message.contains("subject id"), "{e}");
    }
}

#[test]
fn prefix_lengths_are_bounded() {
    let e = parse(&CUSTOMERS.replace("length = 3", "length = 9")).unwrap_err();
    assert!(e.field.starts_with("columns.postcode"), "{e}");
    assert!(e.message.contains("1 to 8"), "{e}");
    assert!(parse(&CUSTOMERS.replace("length = 3", "length = 8")).is_ok());
}

#[test]
fn reserved_and_duplicate_output_names_are_rejected() {
    let e = parse(&CUSTOMERS.replace("as = \"postcode_area\"", "as = \"_op\"")).unwrap_err();
    assert!(e.message.contains("reserved"), "{e}");
    let e = parse(&CUSTOMERS.replace("as = \"postcode_area\"", "as = \"balance\"")).unwrap_err();
    assert!(e.message.contains("two rules"), "{e}");
}

#[test]
fn a_row_key_is_the_subject_unless_named_and_only_of_stable_columns() {
    let p = parse(CUSTOMERS).unwrap();
    assert!(!p.current);
    assert_eq!(p.key, ["id"]);
    assert_eq!(p.key_output_columns(), ["_subject"]);

    let keyed = format!("key = [\"id\", \"balance\"]\ncurrent = true\n{CUSTOMERS}");
    let p = parse(&keyed).unwrap();
    assert!(p.current);
    assert_eq!(p.key_output_columns(), ["_subject", "balance"]);

    for (column, why) in [
        (
            "national_id",
            "a key column must be the subject or a column the policy tokenizes or keeps",
        ),
        ("postcode", "a key column must be the subject"),
        ("nowhere", "is neither the subject nor a column the policy names"),
    ] {
        let bad = format!("key = [\"{column}\"]\n{CUSTOMERS}");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.field, "key");
        assert_eq!(e.line, 1);
        assert!(e.to_string().contains(why), "{e}");
    }
    let e = parse(&format!("key = []\n{CUSTOMERS}")).unwrap_err();
    assert!(e.to_string().contains("at least one column"), "{e}");
    // A current table is never keyed by a guess.
    let e = parse(&format!("current = true\n{CUSTOMERS}")).unwrap_err();
    assert_eq!((e.field.as_str(), e.line), ("current", 1));
    assert!(e.to_string().contains("a current table needs `key`"), "{e}");
}
