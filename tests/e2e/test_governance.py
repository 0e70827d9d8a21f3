"""Governance: column classes and tags where catalogs read them (Delta column metadata and table
properties, read by Python `deltalake`; Iceberg field docs and table properties, read by
`pyiceberg`), kept in step with the policy; `sluice check` refusals and its `--tags-json`."""

import json
import shutil

from conftest import DEMO_POLICIES, REPO, run, write_config
from lakes import iceberg_lake, weed  # noqa: F401 (fixtures)


def demo_policies(tmp_path):
    """A copy of the demo's policies the test may change."""
    policies = tmp_path / "policies"
    shutil.copytree(DEMO_POLICIES, policies)
    return policies


def delta_classes(table):
    return {f.name: f.metadata.get("sluice.class") for f in table.schema().fields}


def test_classes_and_tags_reach_delta_and_iceberg_and_follow_the_policy(sluice_bin, tmp_path, iceberg_lake):
    lake = iceberg_lake
    policies = demo_policies(tmp_path)
    customers = policies / "customers.toml"
    customers.write_text(customers.read_text().replace(
        '[columns.national_id]\naction = "encrypt"\nclass = "direct_identifier"',
        '[columns.national_id]\naction = "encrypt"\nclass = "direct_identifier"\ntags = ["government-id", "gdpr-art87"]'))
    config = write_config(tmp_path, REPO / "fixtures" / "demo" / "events", [policies], lake=lake.root,
                          lake_extra=lake.config("both"))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)

    manifest = json.loads(run(sluice_bin, "check", "--config", config, "--tags-json", env=lake.env).stdout)
    columns = manifest["tables"]["customers"]["columns"]
    assert columns["vulnerable"] == {
        "class": "special_category", "tags": [], "action": "keep", "source_column": "vulnerability_flag",
        "type": "Boolean", "comment": "special_category: keep as bool of vulnerability_flag"}
    assert columns["has_email"]["class"] == "operational" and columns["has_email"]["action"] == "derive"
    assert columns["national_id_enc"]["tags"] == ["government-id", "gdpr-art87"]
    assert columns["email_domain"]["tags"] == [], "a derived column does not inherit its source's tags"
    assert columns["_subject"]["class"] == "direct_identifier"
    assert set(manifest["classes"]) >= {"direct_identifier", "quasi_identifier", "special_category", "financial",
                                        "operational"}

    # Delta: column metadata (`comment` is what Spark and Unity Catalog show) and properties.
    delta = lake.delta_table("customers")
    expected = {name: c["class"] for name, c in columns.items()}
    assert {k: v for k, v in delta_classes(delta).items() if k in expected} == expected
    fields = {f.name: f.metadata for f in delta.schema().fields}
    assert fields["age_band"]["comment"] == "quasi_identifier: generalize age_band of date_of_birth"
    assert "sluice.class" not in fields["_op"]
    assert fields["national_id_enc"]["sluice.tags"] == "government-id,gdpr-art87"
    assert fields["national_id_enc"]["comment"].endswith("; tags: government-id, gdpr-art87")
    properties = delta.metadata().configuration
    assert properties["sluice.source_table"] == "public.customers"
    assert properties["sluice.classes"] == "direct_identifier,operational,quasi_identifier,special_category"
    assert json.loads(properties["sluice.classification"]) == {k: v for k, v in expected.items() if v}
    # Iceberg: field docs and table properties.
    iceberg = lake.table("customers")
    docs = {f.name: f.doc for f in iceberg.schema().fields}
    assert docs["age_band"] == fields["age_band"]["comment"]
    assert docs["_op"] is None
    assert iceberg.properties["sluice.classes"] == properties["sluice.classes"]
    assert iceberg.properties["sluice.classification"] == properties["sluice.classification"]
    rows = lake.delta("customers").num_rows

    # The policy changes a class and drops another: both tables follow, no row changes.
    customers.write_text(customers.read_text()
                         .replace('[columns.created_at]\naction = "keep"\nclass = "operational"',
                                  '[columns.created_at]\naction = "keep"\nclass = "financial"')
                         .replace('[columns.postcode]\naction = "generalize"\nclass = "quasi_identifier"\n',
                                  '[columns.postcode]\naction = "generalize"\n'))
    run(sluice_bin, "run", "--config", config, "--once", env=lake.env)
    delta = lake.delta_table("customers")
    classes = delta_classes(delta)
    assert (classes["created_at"], classes["postcode_area"]) == ("financial", None)
    assert delta.schema().fields[[f.name for f in delta.schema().fields].index("postcode_area")].metadata == {
        "comment": "generalize prefix of postcode"}
    assert "financial" in delta.metadata().configuration["sluice.classes"]
    iceberg = lake.table("customers")
    docs = {f.name: f.doc for f in iceberg.schema().fields}
    assert docs["created_at"] == "financial: keep as timestamp of created_at"
    assert docs["postcode_area"] == "generalize prefix of postcode"
    assert "postcode_area" not in json.loads(iceberg.properties["sluice.classification"])
    assert lake.delta("customers").num_rows == lake.iceberg("customers").num_rows == rows


def check_refuses(sluice_bin, config, policy, old, new):
    policy.write_text(policy.read_text().replace(old, new))
    result = run(sluice_bin, "check", "--config", config, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_check_refuses_a_plain_identifier_without_a_reason_and_unknown_classes(sluice_bin, tmp_path):
    policies = demo_policies(tmp_path)
    customers = policies / "customers.toml"
    original = customers.read_text()
    config = write_config(tmp_path, tmp_path / "events", [policies])
    # The demo keeps `vulnerability_flag` (special category) with a stated reason.
    assert "kept in plain: collections staff must see" in run(sluice_bin, "check", "--config", config).stdout

    reason_line = next(line for line in original.splitlines() if line.startswith("allow_plain"))
    stderr = check_refuses(sluice_bin, config, customers, reason_line + "\n", "")
    header = original.splitlines().index("[columns.vulnerability_flag]") + 1
    assert f"customers.toml:{header}: columns.vulnerability_flag.action: `keep` writes a special_category column in plain" in stderr, stderr

    customers.write_text(original)
    stderr = check_refuses(sluice_bin, config, customers, '[columns.postcode]\naction = "generalize"\nclass = "quasi_identifier"',
                           '[columns.postcode]\naction = "generalize"\nclass = "criminal_offence"')
    line = original.splitlines().index("[columns.postcode]") + 3
    assert f"customers.toml:{line}: columns.postcode.class: unknown class `criminal_offence`" in stderr, stderr
    # The pipeline may add classes to the vocabulary.
    config.write_text(config.read_text() + '\n[governance]\nclasses = ["criminal_offence"]\n')
    run(sluice_bin, "check", "--config", config)
    manifest = json.loads(run(sluice_bin, "check", "--config", config, "--tags-json").stdout)
    assert manifest["tables"]["customers"]["columns"]["postcode_area"]["class"] == "criminal_offence"
