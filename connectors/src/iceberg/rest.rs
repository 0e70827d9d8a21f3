//! Committing a rewrite snapshot through a REST catalog. `iceberg` 0.10 commits only its own
//! actions (appends, schema and property changes, snapshot expiry) and keeps the commit request
//! crate-private, so a snapshot that removes files is posted here: the protocol's
//! `POST /v1/{prefix}/namespaces/{namespace}/tables/{table}` with the crate's own
//! `CommitTableRequest`, its requirements asserting the table and the `main` branch are as read
//! (`assert-table-uuid`, `assert-ref-snapshot-id`), so a writer that committed in between makes
//! the catalog answer 409 instead of being overwritten. Configuration, endpoint and
//! authentication follow the crate's client (the `GET /v1/config` overrides, `token`,
//! `credential` through the OAuth2 client-credentials grant, `header.*`).

use std::collections::HashMap;

use iceberg::{Error, ErrorKind, TableIdent, TableRequirement, TableUpdate};
use iceberg_catalog_rest::CommitTableRequest;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

/// What a commit request came to.
#[derive(Debug, PartialEq)]
pub(crate) enum Posted {
    Committed,
    /// A requirement failed (HTTP 409): another writer committed first.
    Conflict,
}

/// A REST catalog's commit endpoint, authenticated.
pub(crate) struct RestCommits {
    client: reqwest::Client,
    /// `{uri}/v1[/{prefix}]`.
    base: String,
    /// The catalog's URI as configured (where the OAuth2 token endpoint defaults to).
    uri: String,
    properties: HashMap<String, String>,
    headers: reqwest::header::HeaderMap,
    /// Renewed when the catalog refuses it (commits are made through a shared reference).
    bearer: std::sync::Mutex<Option<String>>,
}

/// A catalog that does not answer within this long: the request failed (or, for a commit,
/// its outcome is unknown).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// "Authentication timeout", which some catalogs answer for an expired token.
const EXPIRED_TOKEN: u16 = 419;

#[derive(Deserialize)]
struct CatalogConfig {
    #[serde(default)]
    defaults: HashMap<String, String>,
    #[serde(default)]
    overrides: HashMap<String, String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
}

fn unexpected(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unexpected, message.into())
}

/// A client error's text without the URL (which may carry user information).
fn shown(e: reqwest::Error) -> String {
    e.without_url().to_string()
}

impl RestCommits {
    /// Reads the catalog's configuration (as the crate's client does) and authenticates.
    pub(crate) async fn connect(
        uri: &str,
        warehouse: Option<&str>,
        properties: &HashMap<String, String>,
    ) -> Result<Self, Error> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in properties
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("header.").map(|k| (k, v)))
        {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::new(ErrorKind::DataInvalid, format!("invalid header name `{name}`")))?;
            // The value is not shown: headers may carry credentials.
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| Error::new(ErrorKind::DataInvalid, format!("invalid value of header `{name}`")))?;
            headers.insert(name, value);
        }
        let uri = uri.trim_end_matches('/').to_string();
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| unexpected(format!("catalog client: {}", shown(e))))?;
        let mut this = Self {
            client,
            base: format!("{uri}/v1"),
            uri: uri.clone(),
            properties: properties.clone(),
            headers,
            bearer: std::sync::Mutex::new(properties.get("token").cloned()),
        };
        this.authenticate().await?;
        let mut request = this.request(Method::GET, format!("{uri}/v1/config"));
        if let Some(w) = warehouse {
            request = request.query(&[("warehouse", w)]);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unexpected(format!("catalog config: {}", shown(e))))?;
        if response.status() != StatusCode::OK {
            return Err(unexpected(format!("catalog config: HTTP {}", response.status())));
        }
        let config: CatalogConfig = response
            .json()
            .await
            .map_err(|e| unexpected(format!("catalog config: {}", shown(e))))?;
        // Precedence as the crate's client: server defaults, then ours, then server overrides;
        // only an override moves the endpoint (as for the crate's own requests).
        let mut merged = config.defaults;
        merged.extend(properties.clone());
        merged.extend(config.overrides.clone());
        let uri = config
            .overrides
            .get("uri")
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or(uri);
        this.base = match merged.get("prefix") {
            Some(prefix) => format!("{uri}/v1/{prefix}"),
            None => format!("{uri}/v1"),
        };
        Ok(this)
    }

    /// The OAuth2 client-credentials exchange, when a `credential` (`id:secret` or `secret`) is
    /// configured and no `token` is; again when the catalog no longer accepts the token.
    async fn authenticate(&self) -> Result<(), Error> {
        let properties = &self.properties;
        let Some(credential) = properties
            .get("credential")
            .filter(|_| !properties.contains_key("token"))
        else {
            return Ok(());
        };
        let endpoint = properties
            .get("oauth2-server-uri")
            .cloned()
            .unwrap_or_else(|| format!("{}/v1/oauth/tokens", self.uri));
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        match credential.split_once(':') {
            Some((id, secret)) => form.extend([("client_id", id), ("client_secret", secret)]),
            None => form.push(("client_secret", credential.as_str())),
        }
        form.push(("scope", properties.get("scope").map_or("catalog", String::as_str)));
        for name in ["audience", "resource"] {
            if let Some(v) = properties.get(name) {
                form.push((name, v.as_str()));
            }
        }
        let response = self
            .client
            .post(&endpoint)
            .headers(self.headers.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| unexpected(format!("catalog authentication: {}", shown(e))))?;
        if response.status() != StatusCode::OK {
            return Err(unexpected(format!(
                "catalog authentication: HTTP {}",
                response.status()
            )));
        }
        let token: TokenResponse = response
            .json()
            .await
            .map_err(|e| unexpected(format!("catalog authentication: {}", shown(e))))?;
        *self.bearer.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.access_token);
        Ok(())
    }

    fn request(&self, method: Method, url: String) -> reqwest::RequestBuilder {
        let mut request = self.client.request(method, url).headers(self.headers.clone());
        if let Some(token) = self.bearer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            request = request.bearer_auth(token);
        }
        request
    }

    /// The table's endpoint, as the crate's client spells it.
    fn table_endpoint(&self, table: &TableIdent) -> String {
        format!(
            "{}/namespaces/{}/tables/{}",
            self.base,
            table.namespace().to_url_string(),
            table.name()
        )
    }

    /// Posts `updates` to `table` under `requirements`. A token the catalog no longer accepts
    /// (401 or 419: nothing was applied) is renewed once and the request sent again.
    pub(crate) async fn commit(
        &self,
        table: &TableIdent,
        requirements: Vec<TableRequirement>,
        updates: Vec<TableUpdate>,
    ) -> Result<Posted, Error> {
        let body = CommitTableRequest {
            identifier: Some(table.clone()),
            requirements,
            updates,
        };
        let mut renewed = false;
        loop {
            let response = self
                .request(Method::POST, self.table_endpoint(table))
                .json(&body)
                .send()
                .await
                // Once a request may have left, its outcome is unknown: not a rejection.
                .map_err(|e| unexpected(format!("commit of {table}: {}; the commit state is unknown", shown(e))))?;
            let status = response.status();
            let expired = status == StatusCode::UNAUTHORIZED || status.as_u16() == EXPIRED_TOKEN;
            match status {
                // The answer's body (the new metadata) is not needed: the table is read again.
                StatusCode::OK => return Ok(Posted::Committed),
                StatusCode::CONFLICT => return Ok(Posted::Conflict),
                _ if expired && !renewed && self.properties.contains_key("credential") => {
                    renewed = true;
                    self.authenticate().await?;
                }
                StatusCode::NOT_FOUND => {
                    return Err(Error::new(ErrorKind::TableNotFound, format!("{table} does not exist")))
                }
                // 400, 401, 403…: refused, nothing applied.
                status if status.is_client_error() => {
                    return Err(Error::new(
                        ErrorKind::DataInvalid,
                        format!("commit of {table} refused: HTTP {status}"),
                    ))
                }
                // 500, 502, 504…: the commit may or may not have happened. Stopping is safe:
                // the positions (and an erasure's marker) live in the snapshot, read back on
                // restart.
                status => {
                    return Err(unexpected(format!(
                        "commit of {table}: HTTP {status}; the commit state is unknown"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::NamespaceIdent;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// A one-connection-per-request HTTP peer answering from `answers` in order; returns what
    /// it was asked (request line, headers and body).
    fn serve(answers: Vec<(u16, &'static str)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body_in = vec![0; length];
                reader.read_exact(&mut body_in).unwrap();
                seen.push(format!("{head}\n{}", String::from_utf8_lossy(&body_in)));
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (uri, handle)
    }

    #[tokio::test]
    async fn a_commit_asserts_the_branch_and_a_409_is_a_conflict() {
        let committed = r#"{"metadata-location":"s3://b/t/metadata/00002.metadata.json","metadata":{"format-version":2,"table-uuid":"9c12d441-03fe-4693-9a96-a0705ddf69c1","location":"s3://b/t","last-sequence-number":0,"last-updated-ms":1,"last-column-id":1,"current-schema-id":0,"schemas":[{"type":"struct","schema-id":0,"fields":[{"id":1,"name":"x","required":false,"type":"long"}]}],"default-spec-id":0,"partition-specs":[{"spec-id":0,"fields":[]}],"last-partition-id":999,"default-sort-order-id":0,"sort-orders":[{"order-id":0,"fields":[]}],"properties":{},"snapshots":[],"snapshot-log":[],"metadata-log":[]}}"#;
        let (uri, peer) = serve(vec![
            (200, r#"{"access_token":"t0k3n","token_type":"bearer"}"#),
            (200, r#"{"defaults":{},"overrides":{"prefix":"wh1"}}"#),
            (
                409,
                r#"{"error":{"message":"branch main has changed","type":"CommitFailedException","code":409}}"#,
            ),
            (200, committed),
        ]);
        let properties = HashMap::from([
            ("credential".to_string(), "id:s3cr3t".to_string()),
            (
                "header.X-Iceberg-Access-Delegation".to_string(),
                "vended-credentials".to_string(),
            ),
        ]);
        let commits = RestCommits::connect(&uri, Some("s3://b"), &properties).await.unwrap();
        let table = TableIdent::new(NamespaceIdent::new("ns".into()), "t".into());
        let requirements = vec![TableRequirement::RefSnapshotIdMatch {
            r#ref: "main".into(),
            snapshot_id: Some(7),
        }];
        let updates = vec![TableUpdate::RemoveSnapshots { snapshot_ids: vec![3] }];
        let first = commits
            .commit(&table, requirements.clone(), updates.clone())
            .await
            .unwrap();
        assert_eq!(first, Posted::Conflict);
        let second = commits.commit(&table, requirements, updates).await.unwrap();
        assert_eq!(second, Posted::Committed);
        let seen = peer.join().unwrap();
        assert!(seen[0].starts_with("POST /v1/oauth/tokens"), "{}", seen[0]);
        assert!(seen[0].contains("client_secret=s3cr3t") && seen[0].contains("grant_type=client_credentials"));
        assert!(
            seen[1].starts_with("GET /v1/config?warehouse=s3%3A%2F%2Fb"),
            "{}",
            seen[1]
        );
        for request in &seen[1..] {
            assert!(
                request.to_ascii_lowercase().contains("authorization: bearer t0k3n"),
                "{request}"
            );
            assert!(request
                .to_ascii_lowercase()
                .contains("x-iceberg-access-delegation: vended-credentials"));
        }
        assert!(
            seen[2].starts_with("POST /v1/wh1/namespaces/ns/tables/t "),
            "{}",
            seen[2]
        );
        let body: serde_json::Value = serde_json::from_str(seen[2].split_once("\n\n").unwrap().1).unwrap();
        assert_eq!(
            body["requirements"],
            serde_json::json!([{"type": "assert-ref-snapshot-id", "ref": "main", "snapshot-id": 7}])
        );
        assert_eq!(body["updates"][0]["action"], "remove-snapshots");
        assert_eq!(body["identifier"]["name"], "t");
    }

    #[tokio::test]
    async fn an_unknown_outcome_is_an_error_not_a_conflict() {
        let (uri, peer) = serve(vec![(200, r#"{"overrides":{}}"#), (502, "{}")]);
        let commits = RestCommits::connect(&uri, None, &HashMap::new()).await.unwrap();
        let table = TableIdent::new(NamespaceIdent::new("ns".into()), "t".into());
        let err = commits.commit(&table, vec![], vec![]).await.unwrap_err();
        assert!(err.to_string().contains("commit state is unknown"), "{err}");
        let seen = peer.join().unwrap();
        assert!(seen[1].starts_with("POST /v1/namespaces/ns/tables/t "), "{}", seen[1]);
    }

    #[tokio::test]
    async fn an_expired_token_is_renewed_once_and_a_refusal_is_not_an_unknown_outcome() {
        let (uri, peer) = serve(vec![
            (200, r#"{"access_token":"first","token_type":"bearer"}"#),
            (200, r#"{"overrides":{}}"#),
            (
                401,
                r#"{"error":{"message":"token expired","type":"NotAuthorizedException","code":401}}"#,
            ),
            (200, r#"{"access_token":"second","token_type":"bearer"}"#),
            (200, "not the metadata the client would parse"),
            (
                403,
                r#"{"error":{"message":"forbidden","type":"ForbiddenException","code":403}}"#,
            ),
        ]);
        let properties = HashMap::from([("credential".to_string(), "id:s3cr3t".to_string())]);
        let commits = RestCommits::connect(&uri, None, &properties).await.unwrap();
        let table = TableIdent::new(NamespaceIdent::new("ns".into()), "t".into());
        // Renewed, sent again, committed (the 200's body is not needed).
        assert_eq!(commits.commit(&table, vec![], vec![]).await.unwrap(), Posted::Committed);
        let err = commits.commit(&table, vec![], vec![]).await.unwrap_err();
        assert!(err.to_string().contains("refused: HTTP 403"), "{err}");
        assert!(
            !err.to_string().contains("unknown") && !err.to_string().contains("s3cr3t"),
            "{err}"
        );
        let seen = peer.join().unwrap();
        assert!(seen[2].to_ascii_lowercase().contains("authorization: bearer first"));
        assert!(seen[3].starts_with("POST /v1/oauth/tokens"), "{}", seen[3]);
        assert!(seen[4].to_ascii_lowercase().contains("authorization: bearer second"));
    }
}
