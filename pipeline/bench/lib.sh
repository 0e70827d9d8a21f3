# Shared by the benchmark scripts (sourced, from the repository root).

# file_pipeline_config DIR POLICIES: DIR/sluice.toml, a pipeline reading the event files in
# DIR/events into a local lake in DIR/lake, keys in DIR/keys under the test master key.
file_pipeline_config() {
  cat > "$1/sluice.toml" <<TOML
name = "bench"
policies = ["$2"]
[source]
kind = "file"
path = "events"
[lake]
root = "lake"
[keys]
store = "keys/keystore.db"
master_key_file = "$PWD/fixtures/keys/TEST-ONLY-master.key"
TOML
}

# payments_policy FILE TARGET [COLUMN...]: a policy for public.payments writing TARGET: the
# customer tokenized, amount_pence kept, and each COLUMN kept as text.
payments_policy() {
  local file=$1 target=$2
  shift 2
  {
    cat <<TOML
table = "public.payments"
target = "$target"
subject = "customer_id"
token_domain = "customer"
[columns.customer_id]
action = "tokenize"
[columns.amount_pence]
action = "keep"
type = "int64"
TOML
    for column in "$@"; do
      printf '[columns.%s]\naction = "keep"\ntype = "string"\n' "$column"
    done
  } > "$file"
}
