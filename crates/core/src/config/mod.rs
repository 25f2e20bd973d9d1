//! The plugin configuration (CONTRACT "Configuration"): parsed once per configuration push,
//! with every default applied and every value checked, so the request path never
//! re-validates anything.
use crate::quotas::allowance::Mode;
use crate::quotas::quota::{parse_quotas, Quota};
use crate::vocabulary::bucket_spec::{parse_bucket, BucketSpec, MAX_BUCKET_NUMBER};
use crate::vocabulary::canonical_path::canonical_path;
use crate::vocabulary::json_fields::{FieldError, FieldResult, Object};
use serde_json::Value;
use std::rc::Rc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The whole header value is the key.
    Header { name: String },
    /// The header value is `SCHEME <key>`; values with another scheme are not ours.
    SchemeHeader { name: String, scheme: String },
    /// A query parameter, decoded as `application/x-www-form-urlencoded`.
    Query { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyService {
    pub cluster: String,
    pub authority: String,
    /// The configured path split around `{key_hash}`.
    path_before_hash: String,
    path_after_hash: String,
    pub timeout_ms: u64,
    /// Lookups in flight on the node at most; one more is answered as overloaded.
    pub max_pending: u32,
    pub headers: Vec<(String, String)>,
    /// The key service's change feed; `None`: not polled.
    pub changes: Option<ChangeFeed>,
}

/// `key_service.changes` (CONTRACT "Change feed").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeFeed {
    pub path: String,
    pub interval_ms: u64,
    /// How long a found key is trusted while the feed is healthy.
    pub ttl_s: u64,
}

impl KeyService {
    pub fn path_for(&self, key_hash_hex: &str) -> String {
        format!(
            "{}{}{}",
            self.path_before_hash, key_hash_hex, self.path_after_hash
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub ttl_s: u64,
    pub negative_ttl_s: u64,
    pub stale_if_error_s: u64,
    pub max_entries: u32,
    /// 0 to 90; 0: no refresh ahead.
    pub refresh_ahead_pct: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub path_prefix: String,
    /// `None`: any method.
    pub methods: Option<Vec<String>>,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    pub key_id: String,
    pub owner: String,
    pub scopes: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BruteForce {
    pub max_failures: u32,
    pub period_s: u32,
    /// Budgets are kept per IPv4 network of this many bits (8 to 32, default 32)…
    pub ipv4_prefix: u8,
    /// …and per IPv6 network of this many (32 to 128, default 64: a client's /64).
    pub ipv6_prefix: u8,
}

/// `key_format` (CONTRACT "Key format").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    pub prefixes: Vec<String>,
    pub checksum: Option<Checksum>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Crc32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Closed,
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub key_sources: Vec<KeySource>,
    pub key_service: KeyService,
    pub cache: CacheConfig,
    pub rate_limit: Option<BucketSpec>,
    pub rules: Vec<Rule>,
    pub identity_headers: IdentityHeaders,
    pub brute_force: Option<BruteForce>,
    pub failure_mode: FailureMode,
    pub key_format: Option<KeyFormat>,
    /// `per_key_stats.max_keys`; `None`: no per-key stats.
    pub per_key_stats: Option<u32>,
    pub rate_limit_service: Option<RateLimitService>,
    /// The `WWW-Authenticate` value of every 401, derived from the key sources.
    pub www_authenticate: String,
}

const FIELDS: &[&str] = &[
    "key_sources",
    "key_service",
    "cache",
    "rate_limit",
    "rules",
    "identity_headers",
    "brute_force",
    "failure_mode",
    "key_format",
    "per_key_stats",
    "rate_limit_service",
];

/// The fields each object accepts; anything else is refused. docs/configuration.md's
/// table is checked against these (see the tests).
const KEY_SOURCE_FIELDS: &[&str] = &["header", "scheme", "query"];
const KEY_SERVICE_FIELDS: &[&str] = &[
    "cluster",
    "authority",
    "path",
    "timeout_ms",
    "max_pending",
    "headers",
    "changes",
];
const CHANGES_FIELDS: &[&str] = &["path", "interval_ms", "ttl_s"];
const CACHE_FIELDS: &[&str] = &[
    "ttl_s",
    "negative_ttl_s",
    "stale_if_error_s",
    "max_entries",
    "refresh_ahead_pct",
];
const BUCKET_FIELDS: &[&str] = &["requests", "period_s", "burst"];
const RULE_FIELDS: &[&str] = &["path_prefix", "methods", "scopes"];
const IDENTITY_FIELDS: &[&str] = &["key_id", "owner", "scopes"];
const BRUTE_FORCE_FIELDS: &[&str] = &["max_failures", "period_s", "ipv4_prefix", "ipv6_prefix"];
const KEY_FORMAT_FIELDS: &[&str] = &["prefixes", "checksum"];
const PER_KEY_STATS_FIELDS: &[&str] = &["max_keys"];
const RATE_LIMIT_SERVICE_FIELDS: &[&str] = &[
    "cluster",
    "domain",
    "timeout_ms",
    "sync_interval_ms",
    "default_quotas",
    "failure_mode",
];

/// Upper bounds that keep arithmetic and shared data sane; far above any real need.
const MAX_SECONDS: u64 = 10 * 365 * 24 * 3600;
const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_ENTRIES: u64 = 10_000_000;

impl Config {
    /// Parses the plugin configuration. Empty means all defaults, which still lack
    /// `key_service.cluster` and so are refused like any other gap.
    pub fn parse(raw: &[u8]) -> FieldResult<Config> {
        let text = std::str::from_utf8(raw)
            .map_err(|_| FieldError::new("", "configuration is not UTF-8"))?;
        let doc: Value = if text.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            // from_slice, like the key service's answers: one copy of serde_json's parser.
            serde_json::from_slice(raw)
                .map_err(|e| FieldError::new("", format!("configuration is not valid JSON: {e}")))?
        };
        let root = Object::new("", &doc)
            .map_err(|_| FieldError::new("", "configuration must be a JSON object"))?;
        root.refuse_unknown(FIELDS)?;

        let key_sources = parse_key_sources(&root)?;
        let www_authenticate = challenge_for(&key_sources);
        Ok(Config {
            www_authenticate,
            key_sources,
            key_service: parse_key_service(&root)?,
            cache: parse_cache(&root)?,
            rate_limit: parse_nullable_bucket(&root, "rate_limit", Some(default_bucket()))?,
            rules: parse_rules(&root)?,
            identity_headers: parse_identity_headers(&root)?,
            brute_force: parse_brute_force(&root)?,
            key_format: parse_key_format(&root)?,
            per_key_stats: match root.object("per_key_stats")? {
                None => None,
                Some(stats) => {
                    stats.refuse_unknown(PER_KEY_STATS_FIELDS)?;
                    Some(stats.u64_in("max_keys", 1000, 1, 100_000)? as u32)
                }
            },
            failure_mode: parse_failure_mode(&root, FailureMode::Closed)?,
            rate_limit_service: parse_rate_limit_service(&root)?,
        })
    }
}

impl Config {
    /// The effective configuration, for the start-up log line: every value except those
    /// of `key_service.headers`, which are often credentials.
    pub fn summary(&self) -> String {
        let sources: Vec<String> = self
            .key_sources
            .iter()
            .map(|s| match s {
                KeySource::Header { name } => format!("header {name}"),
                KeySource::SchemeHeader { name, scheme } => format!("header {name} ({scheme})"),
                KeySource::Query { name } => format!("query {name}"),
            })
            .collect();
        let bucket = |b: Option<BucketSpec>| match b {
            Some(b) => format!("{}/{}s burst {}", b.requests, b.period_s, b.burst),
            None => "none".to_string(),
        };
        let ks = &self.key_service;
        let header_names: Vec<&str> = ks.headers.iter().map(|(n, _)| n.as_str()).collect();
        let changes = match &ks.changes {
            Some(c) => format!(
                "{{path={} interval_ms={} ttl_s={}}}",
                c.path, c.interval_ms, c.ttl_s
            ),
            None => "off".to_string(),
        };
        format!(
            "key_sources=[{}] key_service={{cluster={} authority={} path={} timeout_ms={} headers=[{}] changes={}}} \
             cache={{ttl_s={} negative_ttl_s={} stale_if_error_s={} max_entries={} refresh_ahead_pct={}}} rate_limit={} \
             rules={} identity_headers=[{}, {}, {}] brute_force={} failure_mode={} key_format={} \
             per_key_stats={} rate_limit_service={}",
            sources.join(", "),
            ks.cluster,
            ks.authority,
            ks.path_for("{key_hash}"),
            ks.timeout_ms,
            header_names.join(", "),
            changes,
            self.cache.ttl_s,
            self.cache.negative_ttl_s,
            self.cache.stale_if_error_s,
            self.cache.max_entries,
            self.cache.refresh_ahead_pct,
            bucket(self.rate_limit),
            self.rules.len(),
            self.identity_headers.key_id,
            self.identity_headers.owner,
            self.identity_headers.scopes,
            match self.brute_force {
                Some(b) => format!("{} failures/{}s", b.max_failures, b.period_s),
                None => "off".to_string(),
            },
            failure_mode_name(self.failure_mode),
            match &self.key_format {
                Some(f) => format!(
                    "{{prefixes=[{}] checksum={}}}",
                    f.prefixes.join(", "),
                    if f.checksum.is_some() { "crc32" } else { "none" }
                ),
                None => "any".to_string(),
            },
            match self.per_key_stats {
                Some(max_keys) => format!("{{max_keys={max_keys}}}"),
                None => "off".to_string(),
            },
            match &self.rate_limit_service {
                Some(r) => format!(
                    "{{cluster={} domain={} timeout_ms={} sync_interval_ms={} default_quotas={} failure_mode={}}}",
                    r.cluster,
                    r.domain,
                    r.timeout_ms,
                    r.sync_interval_ms,
                    r.default_quotas.len(),
                    failure_mode_name(r.failure_mode)
                ),
                None => "off".to_string(),
            },
        )
    }
}

/// Where quotas are kept across nodes (CONTRACT "Quotas").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitService {
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u64,
    /// 0: every request with quotas asks (exact); else how often a node reports.
    pub sync_interval_ms: u64,
    pub default_quotas: Rc<[Quota]>,
    pub failure_mode: FailureMode,
}

impl RateLimitService {
    /// Every request with quotas asks the service.
    pub fn exact(&self) -> bool {
        self.sync_interval_ms == 0
    }

    /// What the node's allowances need to know of it.
    pub fn mode(&self) -> Mode {
        Mode {
            sync_interval_ms: self.sync_interval_ms,
            failure_open: self.failure_mode == FailureMode::Open,
        }
    }

    /// How often a node reports what it admitted unasked: every `sync_interval_ms`, and
    /// in the exact mode (where only requests admitted while the service failed are
    /// reported) once a second.
    pub fn report_interval_ms(&self) -> u64 {
        if self.exact() {
            1_000
        } else {
            self.sync_interval_ms
        }
    }
}

fn failure_mode_name(mode: FailureMode) -> &'static str {
    match mode {
        FailureMode::Closed => "closed",
        FailureMode::Open => "open",
    }
}

fn parse_failure_mode(object: &Object, default: FailureMode) -> FieldResult<FailureMode> {
    match object.string("failure_mode")? {
        None => Ok(default),
        Some("closed") => Ok(FailureMode::Closed),
        Some("open") => Ok(FailureMode::Open),
        Some(_) => Err(FieldError::new(
            object.path_of("failure_mode"),
            "must be \"closed\" or \"open\"",
        )),
    }
}

fn parse_rate_limit_service(root: &Object) -> FieldResult<Option<RateLimitService>> {
    let Some(rls) = root.object("rate_limit_service")? else {
        return Ok(None);
    };
    rls.refuse_unknown(RATE_LIMIT_SERVICE_FIELDS)?;
    let cluster = match rls.string("cluster")? {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => {
            return Err(FieldError::new(
                rls.path_of("cluster"),
                "is required (an Envoy cluster speaking HTTP/2 to an RLS server)",
            ))
        }
    };
    let domain = rls.string("domain")?.unwrap_or("apikey");
    if domain.is_empty() {
        return Err(FieldError::new(rls.path_of("domain"), "must not be empty"));
    }
    let default_quotas = match rls.value("default_quotas") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => parse_quotas(&rls.path_of("default_quotas"), value)?,
    };
    Ok(Some(RateLimitService {
        cluster,
        domain: domain.to_string(),
        timeout_ms: rls.u64_in("timeout_ms", 100, 1, MAX_TIMEOUT_MS)?,
        sync_interval_ms: rls.u64_in("sync_interval_ms", 1000, 0, 3_600_000)?,
        default_quotas: default_quotas.into(),
        failure_mode: parse_failure_mode(&rls, FailureMode::Open)?,
    }))
}

fn default_bucket() -> BucketSpec {
    BucketSpec {
        requests: 100,
        period_s: 60,
        burst: 100,
    }
}

fn parse_key_sources(root: &Object) -> FieldResult<Vec<KeySource>> {
    let Some(items) = root.array("key_sources")? else {
        return Ok(vec![KeySource::Header {
            name: "x-api-key".into(),
        }]);
    };
    if items.is_empty() {
        return Err(FieldError::new(
            "key_sources",
            "must list at least one source",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_key_source(&Object::new(format!("key_sources[{i}]"), item)?))
        .collect()
}

fn parse_key_source(source: &Object) -> FieldResult<KeySource> {
    source.refuse_unknown(KEY_SOURCE_FIELDS)?;
    match (
        source.string("header")?,
        source.string("scheme")?,
        source.string("query")?,
    ) {
        (Some(header), None, None) => Ok(KeySource::Header {
            name: header_name(&source.path_of("header"), header)?,
        }),
        (Some(header), Some(scheme), None) => {
            if scheme.is_empty() || !scheme.bytes().all(is_token_byte) {
                return Err(FieldError::new(
                    source.path_of("scheme"),
                    "must be a single word such as \"Bearer\"",
                ));
            }
            Ok(KeySource::SchemeHeader {
                name: header_name(&source.path_of("header"), header)?,
                scheme: scheme.to_string(),
            })
        }
        (None, None, Some(query)) if !query.is_empty() => Ok(KeySource::Query {
            name: query.to_string(),
        }),
        (None, None, Some(_)) => Err(FieldError::new(
            source.path_of("query"),
            "must not be empty",
        )),
        (None, Some(_), _) | (_, Some(_), Some(_)) => Err(FieldError::new(
            source.path_of("scheme"),
            "goes only with \"header\"",
        )),
        _ => Err(FieldError::new(
            source.path(),
            "must have exactly one of \"header\" or \"query\"",
        )),
    }
}

fn parse_key_service(root: &Object) -> FieldResult<KeyService> {
    let Some(service) = root.object("key_service")? else {
        return Err(FieldError::new("key_service.cluster", "is required"));
    };
    service.refuse_unknown(KEY_SERVICE_FIELDS)?;
    let cluster = match service.string("cluster")? {
        Some(c) if !c.is_empty() => c.to_string(),
        Some(_) => return Err(FieldError::new("key_service.cluster", "must not be empty")),
        None => return Err(FieldError::new("key_service.cluster", "is required")),
    };
    let authority = match service.string("authority")? {
        Some(a) if !is_header_value(a) || a.is_empty() => {
            return Err(FieldError::new(
                "key_service.authority",
                "must be a non-empty host name",
            ))
        }
        Some(a) => a.to_string(),
        None => cluster.clone(),
    };
    let path = service.string("path")?.unwrap_or("/v1/keys/{key_hash}");
    let Some((before, after)) = path.split_once("{key_hash}") else {
        return Err(FieldError::new(
            "key_service.path",
            "must contain {key_hash}",
        ));
    };
    if !path.starts_with('/') || !is_header_value(path) || path.contains(' ') {
        return Err(FieldError::new(
            "key_service.path",
            "must be a path starting with /",
        ));
    }
    let headers = match service.object("headers")? {
        None => Vec::new(),
        Some(headers) => {
            let mut pairs = Vec::new();
            for (name, value) in headers.entries() {
                let field = headers.path_of(name);
                let Some(value) = value.as_str().filter(|v| is_header_value(v)) else {
                    return Err(FieldError::new(
                        field,
                        "must be a string without line breaks",
                    ));
                };
                pairs.push((header_name(&field, name)?, value.to_string()));
            }
            pairs
        }
    };
    Ok(KeyService {
        cluster,
        authority,
        path_before_hash: before.to_string(),
        path_after_hash: after.to_string(),
        timeout_ms: service.u64_in("timeout_ms", 500, 1, MAX_TIMEOUT_MS)?,
        max_pending: service.u64_in("max_pending", 1000, 1, 1_000_000)? as u32,
        headers,
        changes: parse_changes(&service)?,
    })
}

fn parse_key_format(root: &Object) -> FieldResult<Option<KeyFormat>> {
    let Some(format) = root.object("key_format")? else {
        return Ok(None);
    };
    format.refuse_unknown(KEY_FORMAT_FIELDS)?;
    let prefixes = format.string_list("prefixes")?.unwrap_or_default();
    let visible = |p: &String| {
        !p.is_empty() && p.len() <= 64 && p.bytes().all(|b| (0x21..=0x7e).contains(&b))
    };
    if prefixes.is_empty() || !prefixes.iter().all(visible) {
        return Err(FieldError::new(
            format.path_of("prefixes"),
            "must list at least one prefix of 1 to 64 visible ASCII characters",
        ));
    }
    let checksum = match format.string("checksum")? {
        None => None,
        Some("crc32") => Some(Checksum::Crc32),
        Some(_) => {
            return Err(FieldError::new(
                format.path_of("checksum"),
                "must be \"crc32\" or null",
            ))
        }
    };
    Ok(Some(KeyFormat { prefixes, checksum }))
}

fn parse_changes(service: &Object) -> FieldResult<Option<ChangeFeed>> {
    let Some(changes) = service.object("changes")? else {
        return Ok(None);
    };
    changes.refuse_unknown(CHANGES_FIELDS)?;
    let path = changes.string("path")?.unwrap_or("/v1/key-changes");
    if !path.starts_with('/') || !is_header_value(path) || path.contains([' ', '?', '#']) {
        return Err(FieldError::new(
            changes.path_of("path"),
            "must be a path starting with /, without a query",
        ));
    }
    Ok(Some(ChangeFeed {
        path: path.to_string(),
        interval_ms: changes.u64_in("interval_ms", 1000, 100, 60_000)?,
        ttl_s: changes.u64_in("ttl_s", 3600, 0, MAX_SECONDS)?,
    }))
}

fn parse_cache(root: &Object) -> FieldResult<CacheConfig> {
    let empty = Value::Object(Default::default());
    let cache = match root.object("cache")? {
        Some(cache) => cache,
        None => Object::new("cache", &empty)?,
    };
    cache.refuse_unknown(CACHE_FIELDS)?;
    Ok(CacheConfig {
        ttl_s: cache.u64_in("ttl_s", 60, 0, MAX_SECONDS)?,
        negative_ttl_s: cache.u64_in("negative_ttl_s", 10, 0, MAX_SECONDS)?,
        stale_if_error_s: cache.u64_in("stale_if_error_s", 300, 0, MAX_SECONDS)?,
        max_entries: cache.u64_in("max_entries", 100_000, 1, MAX_ENTRIES)? as u32,
        refresh_ahead_pct: cache.u64_in("refresh_ahead_pct", 20, 0, 90)? as u8,
    })
}

/// `null` means "no limit"; absent means `default`.
fn parse_nullable_bucket(
    parent: &Object,
    name: &str,
    default: Option<BucketSpec>,
) -> FieldResult<Option<BucketSpec>> {
    match parent.value(name) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(value) => {
            let bucket = Object::new(parent.path_of(name), value)?;
            bucket.refuse_unknown(BUCKET_FIELDS)?;
            parse_bucket(&bucket).map(Some)
        }
    }
}

fn parse_rules(root: &Object) -> FieldResult<Vec<Rule>> {
    let Some(items) = root.array("rules")? else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let rule = Object::new(format!("rules[{i}]"), item)?;
            rule.refuse_unknown(RULE_FIELDS)?;
            let path_prefix = match rule.string("path_prefix")? {
                // Held as requests are matched: canonical (see `request::canonical_path`).
                Some(p) if p.starts_with('/') => {
                    String::from_utf8_lossy(&canonical_path(p.as_bytes())).into_owned()
                }
                Some(_) => {
                    return Err(FieldError::new(
                        rule.path_of("path_prefix"),
                        "must start with /",
                    ))
                }
                None => return Err(FieldError::new(rule.path_of("path_prefix"), "is required")),
            };
            let methods = rule.string_list("methods")?;
            if methods
                .as_ref()
                .is_some_and(|m| m.iter().any(|m| m.is_empty()))
            {
                return Err(FieldError::new(
                    rule.path_of("methods"),
                    "must not hold an empty method",
                ));
            }
            Ok(Rule {
                path_prefix,
                methods,
                scopes: rule.string_list("scopes")?.unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_identity_headers(root: &Object) -> FieldResult<IdentityHeaders> {
    let mut names = IdentityHeaders {
        key_id: "x-api-key-id".into(),
        owner: "x-api-key-owner".into(),
        scopes: "x-api-key-scopes".into(),
    };
    if let Some(headers) = root.object("identity_headers")? {
        headers.refuse_unknown(IDENTITY_FIELDS)?;
        for (field, slot) in [
            ("key_id", &mut names.key_id),
            ("owner", &mut names.owner),
            ("scopes", &mut names.scopes),
        ] {
            if let Some(name) = headers.string(field)? {
                *slot = header_name(&headers.path_of(field), name)?;
            }
        }
    }
    Ok(names)
}

fn parse_brute_force(root: &Object) -> FieldResult<Option<BruteForce>> {
    match root.value("brute_force") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            let bf = Object::new("brute_force", value)?;
            bf.refuse_unknown(BRUTE_FORCE_FIELDS)?;
            let required = |name: &str| {
                if bf.u64(name)?.is_none() {
                    return Err(FieldError::new(bf.path_of(name), "is required"));
                }
                bf.u64_in(name, 0, 1, MAX_BUCKET_NUMBER).map(|n| n as u32)
            };
            Ok(Some(BruteForce {
                max_failures: required("max_failures")?,
                period_s: required("period_s")?,
                ipv4_prefix: bf.u64_in("ipv4_prefix", 32, 8, 32)? as u8,
                ipv6_prefix: bf.u64_in("ipv6_prefix", 64, 32, 128)? as u8,
            }))
        }
    }
}

/// RFC 9110 token characters: what a header name or an auth scheme may hold.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_header_value(value: &str) -> bool {
    !value.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// Header names are compared lowercased, as Envoy hands them to filters.
fn header_name(field: &str, name: &str) -> FieldResult<String> {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(FieldError::new(field, "must be a valid HTTP header name"));
    }
    Ok(name.to_ascii_lowercase())
}

fn challenge_for(sources: &[KeySource]) -> String {
    let mut challenges: Vec<String> = Vec::new();
    for source in sources {
        let challenge = match source {
            KeySource::SchemeHeader { scheme, .. } => format!("{scheme} realm=\"api\""),
            KeySource::Header { .. } | KeySource::Query { .. } => "ApiKey realm=\"api\"".into(),
        };
        if !challenges.contains(&challenge) {
            challenges.push(challenge);
        }
    }
    challenges.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> FieldResult<Config> {
        Config::parse(json.as_bytes())
    }

    fn minimal() -> Config {
        parse(r#"{"key_service": {"cluster": "keys"}}"#).unwrap()
    }

    #[test]
    fn rate_limit_service_takes_the_specs_defaults_and_refuses_what_is_wrong() {
        let c = parse(
            r#"{"key_service": {"cluster": "k"}, "rate_limit_service": {"cluster": "ratelimit"}}"#,
        )
        .unwrap();
        let rls = c.rate_limit_service.unwrap();
        assert_eq!(
            (rls.domain.as_str(), rls.timeout_ms, rls.sync_interval_ms),
            ("apikey", 100, 1000)
        );
        assert_eq!(rls.failure_mode, FailureMode::Open);
        assert!(rls.default_quotas.is_empty());
        assert_eq!(minimal().rate_limit_service, None);
        for bad in [
            r#"{}"#,
            r#"{"cluster": ""}"#,
            r#"{"cluster": "r", "domain": ""}"#,
            r#"{"cluster": "r", "timeout_ms": 0}"#,
            r#"{"cluster": "r", "sync_interval_ms": -1}"#,
            r#"{"cluster": "r", "failure_mode": "maybe"}"#,
            r#"{"cluster": "r", "default_quotas": [{"requests": 1, "unit": "week"}]}"#,
            r#"{"cluster": "r", "burst": 1}"#,
        ] {
            let json =
                format!(r#"{{"key_service": {{"cluster": "k"}}, "rate_limit_service": {bad}}}"#);
            assert!(parse(&json).is_err(), "{bad}");
        }
        let exact = parse(
            r#"{"key_service": {"cluster": "k"}, "rate_limit_service": {"cluster": "r", "sync_interval_ms": 0,
                "default_quotas": [{"requests": 10000, "unit": "day", "per": "owner"}], "failure_mode": "closed"}}"#,
        )
        .unwrap()
        .rate_limit_service
        .unwrap();
        assert!(exact.exact());
        assert_eq!(exact.report_interval_ms(), 1000);
        assert_eq!(exact.default_quotas.len(), 1);
        assert!(!exact.mode().failure_open);
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = minimal();
        assert_eq!(
            c.key_sources,
            vec![KeySource::Header {
                name: "x-api-key".into()
            }]
        );
        assert_eq!(c.key_service.authority, "keys");
        assert_eq!(c.key_service.path_for("ab12"), "/v1/keys/ab12");
        assert_eq!(c.key_service.timeout_ms, 500);
        assert!(c.key_service.headers.is_empty());
        assert_eq!(
            c.cache,
            CacheConfig {
                ttl_s: 60,
                negative_ttl_s: 10,
                stale_if_error_s: 300,
                max_entries: 100_000,
                refresh_ahead_pct: 20,
            }
        );
        assert_eq!(c.key_service.changes, None);
        assert_eq!(
            c.rate_limit,
            Some(BucketSpec {
                requests: 100,
                period_s: 60,
                burst: 100
            })
        );
        assert!(c.rules.is_empty());
        assert_eq!(c.identity_headers.key_id, "x-api-key-id");
        assert_eq!(c.identity_headers.owner, "x-api-key-owner");
        assert_eq!(c.identity_headers.scopes, "x-api-key-scopes");
        assert_eq!(c.brute_force, None);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.www_authenticate, "ApiKey realm=\"api\"");
    }

    #[test]
    fn every_field_is_read() {
        let c = parse(
            r#"{
            "key_sources": [{"header": "X-Key"}, {"header": "Authorization", "scheme": "Bearer"}, {"query": "api_key"}],
            "key_service": {"cluster": "ks", "authority": "keys.internal", "path": "/k/{key_hash}/info",
                            "timeout_ms": 250, "headers": {"x-proxy-token": "s3cret"}},
            "cache": {"ttl_s": 5, "negative_ttl_s": 2, "stale_if_error_s": 0, "max_entries": 10},
            "rate_limit": {"requests": 10, "period_s": 1, "burst": 20},
            "rules": [{"path_prefix": "/orders", "methods": ["POST"], "scopes": ["orders:write"]}],
            "identity_headers": {"key_id": "x-client-id"},
            "brute_force": {"max_failures": 5, "period_s": 60},
            "failure_mode": "open"
        }"#,
        )
        .unwrap();
        assert_eq!(
            c.key_sources,
            vec![
                KeySource::Header {
                    name: "x-key".into()
                },
                KeySource::SchemeHeader {
                    name: "authorization".into(),
                    scheme: "Bearer".into()
                },
                KeySource::Query {
                    name: "api_key".into()
                },
            ]
        );
        assert_eq!(c.key_service.authority, "keys.internal");
        assert_eq!(c.key_service.path_for("h"), "/k/h/info");
        assert_eq!(c.key_service.timeout_ms, 250);
        assert_eq!(
            c.key_service.headers,
            vec![("x-proxy-token".into(), "s3cret".into())]
        );
        assert_eq!(c.cache.max_entries, 10);
        assert_eq!(
            c.rate_limit,
            Some(BucketSpec {
                requests: 10,
                period_s: 1,
                burst: 20
            })
        );
        assert_eq!(c.rules[0].methods, Some(vec!["POST".to_string()]));
        assert_eq!(c.identity_headers.key_id, "x-client-id");
        assert_eq!(c.identity_headers.owner, "x-api-key-owner");
        assert_eq!(
            c.brute_force,
            Some(BruteForce {
                max_failures: 5,
                period_s: 60,
                ipv4_prefix: 32,
                ipv6_prefix: 64
            })
        );
        assert_eq!(c.failure_mode, FailureMode::Open);
        assert_eq!(
            c.www_authenticate,
            "ApiKey realm=\"api\", Bearer realm=\"api\""
        );
    }

    #[test]
    fn the_summary_names_every_field_but_no_header_value() {
        let c = parse(
            r#"{"key_service": {"cluster": "ks", "headers": {"x-proxy-token": "s3cret"}},
                "brute_force": {"max_failures": 5, "period_s": 60}}"#,
        )
        .unwrap();
        let summary = c.summary();
        for field in FIELDS {
            assert!(
                summary.contains(&format!("{field}=")),
                "{field} in {summary}"
            );
        }
        assert!(summary.contains("x-proxy-token"));
        assert!(!summary.contains("s3cret"));
        assert!(summary.contains("path=/v1/keys/{key_hash}"));
    }

    /// docs/configuration.md's table: (field, example JSON, row text).
    fn readme_rows() -> Vec<(String, String, String)> {
        crate::doc_section("configuration.md", "Configuration")
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                let cells: Vec<&str> = line.split(" | ").collect();
                let unquote = |cell: &str| {
                    cell.trim_matches(|c| c == '|' || c == ' ' || c == '`')
                        .to_string()
                };
                (unquote(cells[0]), unquote(cells[2]), line.to_string())
            })
            .collect()
    }

    /// Every field the parser accepts, as the tables name them (objects of their own,
    /// `key_service` and `cache`, field by field).
    fn accepted_fields() -> Vec<String> {
        let mut expected: Vec<String> = Vec::new();
        for field in FIELDS {
            match *field {
                "key_service" => expected.extend(
                    KEY_SERVICE_FIELDS
                        .iter()
                        .map(|f| format!("key_service.{f}")),
                ),
                "cache" => expected.extend(CACHE_FIELDS.iter().map(|f| format!("cache.{f}"))),
                other => expected.push(other.to_string()),
            }
        }
        expected
    }

    /// The contract in the repository (docs/CONTRACT.md) names exactly the fields the
    /// parser accepts in its configuration table, and lists the others as planned.
    #[test]
    fn the_contract_documents_exactly_the_fields_the_code_accepts() {
        let contract = include_str!("../../../../docs/CONTRACT.md");
        let table = contract
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|rest| rest.split("\nA bucket is").next())
            .expect("the contract has a Configuration section");
        let mut documented: Vec<String> = table
            .lines()
            .filter(|line| line.starts_with("| `"))
            .filter_map(|line| line.split('`').nth(1).map(str::to_string))
            .collect();
        let mut expected = accepted_fields();
        documented.sort();
        expected.sort();
        assert_eq!(documented, expected);
    }

    #[test]
    fn the_readme_documents_exactly_the_fields_the_code_accepts() {
        let rows = readme_rows();
        let documented: Vec<&str> = rows.iter().map(|(field, _, _)| field.as_str()).collect();
        let expected = accepted_fields();
        assert_eq!(
            documented, expected,
            "docs/configuration.md table rows, in order"
        );
        // Fields of objects documented in one row must be named in that row.
        for (field, inner) in [
            ("key_sources", KEY_SOURCE_FIELDS),
            ("rate_limit", BUCKET_FIELDS),
            ("rules", RULE_FIELDS),
            ("identity_headers", IDENTITY_FIELDS),
            ("brute_force", BRUTE_FORCE_FIELDS),
            ("key_service.changes", CHANGES_FIELDS),
            ("key_format", KEY_FORMAT_FIELDS),
            ("per_key_stats", PER_KEY_STATS_FIELDS),
        ] {
            let (_, _, row) = rows.iter().find(|(f, _, _)| f == field).unwrap();
            for name in inner {
                assert!(
                    row.contains(&format!("\"{name}\"")),
                    "docs/configuration.md row {field} names \"{name}\""
                );
            }
        }
    }

    #[test]
    fn every_readme_example_is_accepted() {
        for (field, example, _) in readme_rows() {
            let value: serde_json::Value = serde_json::from_str(&example)
                .unwrap_or_else(|e| panic!("{field}: {example}: {e}"));
            let mut doc = serde_json::json!({"key_service": {"cluster": "keys"}});
            match field.split_once('.') {
                Some((parent, child)) => doc[parent][child] = value,
                None => doc[&field] = value,
            }
            let parsed = Config::parse(doc.to_string().as_bytes());
            assert!(parsed.is_ok(), "{field}: {example}: {:?}", parsed.err());
        }
    }

    #[test]
    fn the_change_feed_has_defaults_and_bounds() {
        let feed = |changes: &str| {
            parse(&format!(
                r#"{{"key_service": {{"cluster": "k", "changes": {changes}}}}}"#
            ))
        };
        assert_eq!(
            feed("{}").unwrap().key_service.changes,
            Some(ChangeFeed {
                path: "/v1/key-changes".into(),
                interval_ms: 1000,
                ttl_s: 3600
            })
        );
        assert_eq!(feed("null").unwrap().key_service.changes, None);
        for (bad, field) in [
            (r#"{"interval_ms": 99}"#, "key_service.changes.interval_ms"),
            (
                r#"{"interval_ms": 60001}"#,
                "key_service.changes.interval_ms",
            ),
            (r#"{"path": "v1"}"#, "key_service.changes.path"),
            (r#"{"path": "/v1?x=1"}"#, "key_service.changes.path"),
            (r#"{"every": 1}"#, "key_service.changes"),
        ] {
            let error = feed(bad).unwrap_err();
            assert!(error.to_string().starts_with(field), "{bad}: {error}");
        }
        let pct = |n: u32| {
            parse(&format!(
                r#"{{"key_service": {{"cluster": "k"}}, "cache": {{"refresh_ahead_pct": {n}}}}}"#
            ))
        };
        assert_eq!(pct(0).unwrap().cache.refresh_ahead_pct, 0);
        assert_eq!(pct(90).unwrap().cache.refresh_ahead_pct, 90);
        assert!(pct(91).is_err());
    }

    #[test]
    fn null_rate_limit_means_no_limit() {
        let c = parse(r#"{"key_service": {"cluster": "k"}, "rate_limit": null}"#).unwrap();
        assert_eq!(c.rate_limit, None);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("", "key_service.cluster"),
            ("{}", "key_service.cluster"),
            ("[]", ""),
            ("{nope", ""),
            (
                r#"{"key_service": {"cluster": "k"}, "colour": 1}"#,
                "colour",
            ),
            (r#"{"key_service": {"cluster": ""}}"#, "key_service.cluster"),
            (
                r#"{"key_service": {"cluster": "k", "clsuter": "x"}}"#,
                "key_service.clsuter",
            ),
            (
                r#"{"key_service": {"cluster": "k", "path": "/keys"}}"#,
                "key_service.path",
            ),
            (
                r#"{"key_service": {"cluster": "k", "timeout_ms": 0}}"#,
                "key_service.timeout_ms",
            ),
            (
                r#"{"key_service": {"cluster": "k", "timeout_ms": 1.5}}"#,
                "key_service.timeout_ms",
            ),
            (
                r#"{"key_service": {"cluster": "k", "headers": {"bad name": "v"}}}"#,
                "key_service.headers.bad name",
            ),
            (
                r#"{"key_service": {"cluster": "k", "headers": {"x": "a\nb"}}}"#,
                "key_service.headers.x",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "key_sources": []}"#,
                "key_sources",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "key_sources": [{}]}"#,
                "key_sources[0]",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "key_sources": [{"query": "a", "scheme": "B"}]}"#,
                "key_sources[0].scheme",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "key_sources": [{"header": "a", "scheme": "Be arer"}]}"#,
                "key_sources[0].scheme",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "key_sources": [{"header": ":path"}]}"#,
                "key_sources[0].header",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "cache": {"max_entries": 0}}"#,
                "cache.max_entries",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "cache": {"ttl_s": -1}}"#,
                "cache.ttl_s",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "rate_limit": {"requests": 0, "period_s": 1}}"#,
                "rate_limit.requests",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "rate_limit": {"requests": 1}}"#,
                "rate_limit.period_s",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "rules": [{"path_prefix": "orders"}]}"#,
                "rules[0].path_prefix",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "rules": [{"path_prefix": "/", "methods": "GET"}]}"#,
                "rules[0].methods",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "identity_headers": {"owner": ""}}"#,
                "identity_headers.owner",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "brute_force": {"max_failures": 3}}"#,
                "brute_force.period_s",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "brute_force": {"max_failures": 3, "period_s": 1, "ipv6_prefix": 16}}"#,
                "brute_force.ipv6_prefix",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "brute_force": {"max_failures": 3, "period_s": 1, "ipv4_prefix": 33}}"#,
                "brute_force.ipv4_prefix",
            ),
            (
                r#"{"key_service": {"cluster": "k"}, "failure_mode": "ajar"}"#,
                "failure_mode",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).expect_err(json);
            assert_eq!(err.field, field, "{json}: {err}");
            assert!(!err.reason.is_empty());
        }
    }
}
