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

#[test]
fn classes_and_tags_reach_the_output_columns_and_derives_do_not_inherit() {
    let text = CUSTOMERS
        .replace(
            "[columns.email]\naction = \"vault\"",
            "[columns.email]\naction = \"vault\"\nclass = \"direct_identifier\"\ntags = [\"pii\", \"contact\"]",
        )
        .replace(
            "{ name = \"has_email\", fn = \"is_present\" }",
            "{ name = \"has_email\", fn = \"is_present\", class = \"operational\" }",
        )
        .replace(
            "[columns.balance]\naction = \"keep\"",
            "[columns.balance]\naction = \"keep\"\nclass = \"financial\"",
        );
    let p = parse(&text).unwrap();
    let out = p.output_columns();
    let of = |name: &str| out.iter().find(|c| c.name == name).unwrap();
    assert_eq!(of("has_email").class.as_deref(), Some("operational"));
    assert_eq!(of("has_email").action, "derive");
    assert!(of("has_email").tags.is_empty());
    assert_eq!(of("email_domain").class, None, "a derive has its own class, or none");
    assert_eq!(of("balance").class.as_deref(), Some("financial"));
    let email = p.rules.iter().find(|r| r.column == "email").unwrap();
    assert_eq!(email.tags, ["pii", "contact"]);
}

#[test]
fn keeping_a_direct_identifier_or_special_category_column_needs_a_stated_reason() {
    let keep_balance = "[columns.balance]\naction = \"keep\"";
    for class in RESTRICTED_CLASSES {
        let text = CUSTOMERS.replace(keep_balance, &format!("{keep_balance}\nclass = \"{class}\""));
        let e = parse(&text).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("columns.balance.action", 28), "{e}");
        assert!(e.message.contains(&format!("writes a {class} column in plain")), "{e}");
        assert!(e.message.contains("allow_plain"), "{e}");

        let excused = CUSTOMERS.replace(
            keep_balance,
            &format!("{keep_balance}\nclass = \"{class}\"\nallow_plain = \"regulator's return needs exact balances\""),
        );
        let p = parse(&excused).unwrap();
        let rule = p.rules.iter().find(|r| r.column == "balance").unwrap();
        assert_eq!(
            rule.allow_plain.as_deref(),
            Some("regulator's return needs exact balances")
        );

        let blank = CUSTOMERS.replace(
            keep_balance,
            &format!("{keep_balance}\nclass = \"{class}\"\nallow_plain = \" \""),
        );
        assert_eq!(parse(&blank).unwrap_err().field, "columns.balance.allow_plain");
    }
    // A class others may keep needs no reason; an excuse where none is needed is refused.
    let financial = CUSTOMERS.replace(keep_balance, &format!("{keep_balance}\nclass = \"financial\""));
    parse(&financial).unwrap();
    let stale = CUSTOMERS.replace(
        keep_balance,
        &format!("{keep_balance}\nclass = \"financial\"\nallow_plain = \"x\""),
    );
    let e = parse(&stale).unwrap_err();
    assert_eq!(e.field, "columns.balance.allow_plain");
    assert!(e.message.contains("only excuses `keep`"), "{e}");
    // Tokenized, a direct identifier needs no excuse.
    let tokenized = CUSTOMERS.replace(
        "[columns.id]\naction = \"tokenize\"",
        "[columns.id]\naction = \"tokenize\"\nclass = \"direct_identifier\"",
    );
    parse(&tokenized).unwrap();
}

#[test]
fn class_names_and_tags_are_checked() {
    let keep_balance = "[columns.balance]\naction = \"keep\"";
    for (line, field) in [
        ("class = \"Direct Identifier\"", "columns.balance.class"),
        ("tags = [\"\"]", "columns.balance.tags"),
        ("tags = [\"a,b\"]", "columns.balance.tags"),
        ("klass = \"financial\"", "klass"),
    ] {
        let e = parse(&CUSTOMERS.replace(keep_balance, &format!("{keep_balance}\n{line}"))).unwrap_err();
        assert_eq!(e.field, field, "{line}: {e}");
    }
}

#[test]
fn retention_is_a_bounded_number_of_days() {
    let with = |days: &str| {
        parse(&CUSTOMERS.replace(
            "token_domain = \"customer\"",
            &format!("token_domain = \"customer\"\nretention_days = {days}"),
        ))
    };
    assert_eq!(with("2555").unwrap().retention_days, Some(2555));
    assert_eq!(parse(CUSTOMERS).unwrap().retention_days, None);
    for bad in ["0", "36501"] {
        let e = with(bad).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("retention_days", 6), "{e}");
    }
}
