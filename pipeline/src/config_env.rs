//! The environment's part of a config file: `${VAR}` in string values is replaced by the
//! variable's value (`$${` keeps a literal `${`), and `SLUICE_<SECTION>__<KEY>=value` sets
//! `[section] key` (nested sections: `SLUICE_LAKE__S3__ENDPOINT`), so secrets and endpoints
//! can come from a container's environment. Errors still name the file and line — or the
//! variable that set a value — never a value.

use std::path::{Path, PathBuf};

use sluice_transforms::ConfigError;
use toml_edit::{DocumentMut, Item, Table, Value};

/// The prefix of override variables; a section path follows, its parts joined by `__`.
pub const OVERRIDE_PREFIX: &str = "SLUICE_";

/// The text the config is read from, and where each of its lines came from.
pub struct Prepared {
    pub text: String,
    /// Per line of `text`: the file's line, or the variable that set it.
    origins: Vec<Origin>,
    /// Override variables applied (names only, for the log).
    pub overridden: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Origin {
    File(usize),
    Env(String),
}

/// Marks a value set by an override so its line can be told apart after rendering.
const MARK: &str = "# sluice-env:";

impl Prepared {
    /// Rewrites an error about `text` to name the file's line or the variable.
    pub fn locate(&self, mut error: ConfigError, file: &Path) -> ConfigError {
        if error.file != file || self.overridden.is_empty() {
            return error;
        }
        match self.origins.get(error.line.saturating_sub(1)) {
            Some(Origin::File(line)) => error.line = *line,
            Some(Origin::Env(var)) => {
                error.file = PathBuf::from(format!("{} (environment variable {var})", file.display()));
            }
            None => {}
        }
        error
    }
}

/// Expands `${VAR}` references and applies `overrides` (`(variable, value)`, e.g. every
/// `SLUICE_…__…` variable of the process).
pub fn prepare(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    overrides: &[(String, String)],
) -> Result<Prepared, ConfigError> {
    let unchanged = |text: &str| Prepared {
        text: text.to_string(),
        origins: Vec::new(),
        overridden: Vec::new(),
    };
    if !text.contains("${") && overrides.is_empty() {
        return Ok(unchanged(text));
    }
    // A syntax error is reported by the real parse, with its line.
    let Ok(mut doc) = text.parse::<DocumentMut>() else {
        return Ok(unchanged(text));
    };
    expand_table(doc.as_table_mut(), file, text, lookup)?;
    let mut overridden = Vec::new();
    for (var, value) in overrides {
        let Some(path) = var.strip_prefix(OVERRIDE_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if keys.len() < 2 || keys.iter().any(String::is_empty) {
            continue;
        }
        set(doc.as_table_mut(), &keys, value, var).map_err(|message| ConfigError {
            file: PathBuf::from(format!("{} (environment variable {var})", file.display())),
            line: 0,
            field: keys.join("."),
            message,
        })?;
        overridden.push(var.clone());
    }
    let rendered = doc.to_string();
    let origins = origins(text, &rendered);
    Ok(Prepared {
        text: rendered,
        origins,
        overridden,
    })
}

/// The process's override variables, sorted (a stable order of application).
pub fn process_overrides() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(OVERRIDE_PREFIX) && k[OVERRIDE_PREFIX.len()..].contains("__"))
        .collect();
    vars.sort();
    vars
}

fn expand_table(
    table: &mut dyn toml_edit::TableLike,
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (_, item) in table.iter_mut() {
        match item {
            Item::Value(v) => expand_value(v, file, text, lookup)?,
            Item::Table(t) => expand_table(t, file, text, lookup)?,
            Item::ArrayOfTables(a) => {
                for t in a.iter_mut() {
                    expand_table(t, file, text, lookup)?;
                }
            }
            Item::None => {}
        }
    }
    Ok(())
}

fn expand_value(
    value: &mut Value,
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(s) if s.value().contains("${") => {
            let expanded = expand(s.value(), lookup).map_err(|(var, message)| {
                let offset = text.find(&format!("${{{var}}}")).unwrap_or(0);
                ConfigError::new(file, text, offset, format!("${{{var}}}"), message)
            })?;
            replace_keeping_decor(value, single_line_string(&expanded));
        }
        Value::Array(a) => {
            for v in a.iter_mut() {
                expand_value(v, file, text, lookup)?;
            }
        }
        Value::InlineTable(t) => expand_table(t, file, text, lookup)?,
        _ => {}
    }
    Ok(())
}

/// `${VAR}` replaced by its value; `$${` is a literal `${`. Err: (variable, message).
fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| (after.to_string(), "`${` without a closing `}`".to_string()))?;
            let var = &after[..end];
            if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err((var.to_string(), "not a variable name".into()));
            }
            let value =
                lookup(var).ok_or_else(|| (var.to_string(), format!("environment variable `{var}` is not set")))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A basic (double-quoted) string on one line, whatever it holds: lines never move.
fn single_line_string(s: &str) -> Value {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('"');
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted.parse().expect("a quoted TOML string")
}

fn replace_keeping_decor(value: &mut Value, mut new: Value) {
    *new.decor_mut() = value.decor().clone();
    *value = new;
}

/// Sets `keys` (section path, then key) to `raw`: typed like the value it replaces, or parsed
/// as a TOML value (number, boolean, array) when that works and a string otherwise.
fn set(root: &mut Table, keys: &[String], raw: &str, var: &str) -> Result<(), String> {
    let (key, sections) = keys.split_last().expect("two parts at least");
    let mut table = root;
    for section in sections {
        let item = table.entry(section).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = item
            .as_table_mut()
            .ok_or_else(|| format!("`{section}` is not a section"))?;
    }
    let existing_string = table.get(key).and_then(Item::as_str).is_some();
    let mut value = if existing_string {
        single_line_string(raw)
    } else {
        match raw.parse::<Value>() {
            Ok(v) if !matches!(v, Value::InlineTable(_)) && !raw.contains('\n') => v,
            _ => single_line_string(raw),
        }
    };
    value.decor_mut().set_suffix(format!(" {MARK}{var}"));
    match table.get_mut(key) {
        Some(Item::Value(old)) => {
            value
                .decor_mut()
                .set_prefix(old.decor().prefix().cloned().unwrap_or_default());
            *old = value;
        }
        Some(_) => return Err(format!("`{key}` is a section, not a value")),
        None => {
            table.insert(key, Item::Value(value));
        }
    }
    Ok(())
}

/// Where each line of `rendered` came from: rendering keeps the file's lines as they were, in
/// order, but for values replaced (expanded, overridden) and lines an override added.
fn origins(original: &str, rendered: &str) -> Vec<Origin> {
    let file_lines: Vec<&str> = original.lines().collect();
    // The file's next line not matched yet.
    let mut next = 0;
    rendered
        .lines()
        .map(|line| {
            // The file's next line as it was, with its value replaced, or expanded (`${…}`, also
            // inside a multi-line array).
            let matches_next = file_lines
                .get(next)
                .is_some_and(|l| *l == line || same_key(l, line) || (l.contains("${") && !line.contains(MARK)));
            let origin = match line.find(MARK) {
                Some(at) => Origin::Env(line[at + MARK.len()..].trim().to_string()),
                None if matches_next => Origin::File(next + 1),
                // A section header an override added: placed near the file's next line.
                None => Origin::File((next + 1).min(file_lines.len()).max(1)),
            };
            if matches_next {
                next += 1;
            }
            origin
        })
        .collect()
}

fn same_key(a: &str, b: &str) -> bool {
    let key = |s: &str| s.split('=').next().unwrap_or_default().trim().to_string();
    a.contains('=') && key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/sluice/sluice.toml";

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn expands_variables_in_strings_and_keeps_lines() {
        let text = "name = \"p\"\n[lake]\nroot = \"s3://${BUCKET}/lake\"\n# $${literal}\nvault = \"$${x}\"\n[keys]\nstore = \"k\"\n";
        let p = prepare(Path::new(FILE), text, &env(&[("BUCKET", "b\"1")]), &[]).unwrap();
        let parsed: toml::Value = toml::from_str(&p.text).unwrap();
        assert_eq!(parsed["lake"]["root"].as_str(), Some("s3://b\"1/lake"));
        assert_eq!(parsed["lake"]["vault"].as_str(), Some("${x}"));
        assert_eq!(p.text.lines().count(), text.lines().count());
        // A variable inside a multi-line array, then an override: lines after them still map
        // to the file's.
        let multi = "name = \"p\"\npolicies = [\n  \"${DIR}/a\",\n  \"b\",\n]\n[keys]\nstore = \"k\"\nbad = 1\n";
        let p = prepare(
            Path::new(FILE),
            multi,
            &env(&[("DIR", "/etc")]),
            &[("SLUICE_KEYS__STORE".to_string(), "x".to_string())],
        )
        .unwrap();
        let bad = p.text.lines().position(|l| l.starts_with("bad")).unwrap() + 1;
        let located = p.locate(
            ConfigError {
                file: PathBuf::from(FILE),
                line: bad,
                field: "bad".into(),
                message: "unknown field".into(),
            },
            Path::new(FILE),
        );
        assert_eq!(located.line, 8, "{}", p.text);
        let err = prepare(Path::new(FILE), text, &env(&[]), &[]).err().unwrap();
        assert_eq!((err.line, err.field.as_str()), (3, "${BUCKET}"));
        assert!(
            err.message.contains("BUCKET") && err.message.contains("not set"),
            "{err}"
        );
    }

    #[test]
    fn overrides_set_keys_and_errors_name_the_variable_or_the_file_line() {
        let text = "name = \"p\"\n[lake]\nroot = \"lake\"\n[batch]\nmax_rows = 10\n[keys]\nstore = \"k\"\n";
        let overrides = vec![
            ("SLUICE_BATCH__MAX_ROWS".to_string(), "500".to_string()),
            ("SLUICE_LAKE__ROOT".to_string(), "s3://b/x".to_string()),
            (
                "SLUICE_LAKE__S3__ENDPOINT".to_string(),
                "http://127.0.0.1:9000".to_string(),
            ),
            ("SLUICE_LAKE__S3__ALLOW_HTTP".to_string(), "true".to_string()),
        ];
        let p = prepare(Path::new(FILE), text, &env(&[]), &overrides).unwrap();
        let parsed: toml::Value = toml::from_str(&p.text).unwrap();
        assert_eq!(parsed["batch"]["max_rows"].as_integer(), Some(500));
        assert_eq!(parsed["lake"]["root"].as_str(), Some("s3://b/x"));
        assert_eq!(parsed["lake"]["s3"]["endpoint"].as_str(), Some("http://127.0.0.1:9000"));
        assert_eq!(parsed["lake"]["s3"]["allow_http"].as_bool(), Some(true));
        // An error on a line the file has keeps the file's line number; on a value an
        // override set, it names the variable.
        let line_of = |needle: &str| p.text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let at = |line: usize| ConfigError {
            file: PathBuf::from(FILE),
            line,
            field: "f".into(),
            message: "m".into(),
        };
        let store = p.locate(at(line_of("store")), Path::new(FILE));
        assert_eq!((store.file.as_path(), store.line), (Path::new(FILE), 7));
        let endpoint = p.locate(at(line_of("endpoint")), Path::new(FILE));
        assert!(endpoint.to_string().contains("SLUICE_LAKE__S3__ENDPOINT"), "{endpoint}");
        assert!(!endpoint.to_string().contains("127.0.0.1"), "{endpoint}");
        let rows = p.locate(at(line_of("max_rows")), Path::new(FILE));
        assert!(rows.to_string().contains("SLUICE_BATCH__MAX_ROWS"), "{rows}");
        // A string stays a string even if it looks like a number.
        let p = prepare(
            Path::new(FILE),
            text,
            &env(&[]),
            &[("SLUICE_KEYS__STORE".to_string(), "123".to_string())],
        )
        .unwrap();
        let parsed: toml::Value = toml::from_str(&p.text).unwrap();
        assert_eq!(parsed["keys"]["store"].as_str(), Some("123"));
        // Overriding a section with a value is refused, naming the variable.
        let err = prepare(
            Path::new(FILE),
            text,
            &env(&[]),
            &[("SLUICE_LAKE__ROOT__X".to_string(), "1".to_string())],
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("SLUICE_LAKE__ROOT__X"), "{err}");
    }
}
