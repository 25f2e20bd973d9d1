//! Reading JSON objects field by field, so that every error names the exact field
//! (`key_service.timeout_ms`) and says why. Shared by the configuration, which
//! refuses unknown fields, and the key record, which ignores them.
use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

pub type FieldResult<T> = Result<T, FieldError>;

/// A JSON object together with where it sits in the document.
pub struct Object<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Object<'a> {
    pub fn new(path: impl Into<String>, value: &'a Value) -> FieldResult<Self> {
        let path = path.into();
        match value {
            Value::Object(map) => Ok(Object { path, map }),
            _ => Err(FieldError::new(path, "must be a JSON object")),
        }
    }

    pub fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn entries(&self) -> impl Iterator<Item = (&'a str, &'a Value)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn refuse_unknown(&self, known: &[&str]) -> FieldResult<()> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(unknown) => Err(FieldError::new(
                self.path_of(unknown),
                format!("unknown field (known: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// The raw value; `None` when absent. `null` is returned as `Some(Value::Null)` so
    /// callers that give null a meaning can see it.
    pub fn value(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    /// The value, with `null` treated like an absent field.
    fn present(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub fn string(&self, name: &str) -> FieldResult<Option<&'a str>> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(FieldError::new(self.path_of(name), "must be a string")),
        }
    }

    pub fn u64(&self, name: &str) -> FieldResult<Option<u64>> {
        match self.present(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                FieldError::new(self.path_of(name), "must be a whole number, 0 or more")
            }),
        }
    }

    /// A whole number in `min..=max`, or `default` when absent.
    pub fn u64_in(&self, name: &str, default: u64, min: u64, max: u64) -> FieldResult<u64> {
        let n = self.u64(name)?.unwrap_or(default);
        if n < min || n > max {
            return Err(FieldError::new(
                self.path_of(name),
                format!("must be between {min} and {max}"),
            ));
        }
        Ok(n)
    }

    pub fn bool(&self, name: &str) -> FieldResult<Option<bool>> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(FieldError::new(self.path_of(name), "must be true or false")),
        }
    }

    pub fn object(&self, name: &str) -> FieldResult<Option<Object<'a>>> {
        self.present(name)
            .map(|v| Object::new(self.path_of(name), v))
            .transpose()
    }

    pub fn array(&self, name: &str) -> FieldResult<Option<&'a Vec<Value>>> {
        match self.present(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(FieldError::new(self.path_of(name), "must be a list")),
        }
    }

    pub fn string_list(&self, name: &str) -> FieldResult<Option<Vec<String>>> {
        let Some(items) = self.array(name)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(FieldError::new(
                    format!("{}[{i}]", self.path_of(name)),
                    "must be a string",
                )),
            })
            .collect::<FieldResult<Vec<_>>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_nested_field() {
        let doc = json!({"cache": {"ttl_s": "soon"}});
        let root = Object::new("", &doc).unwrap();
        let cache = root.object("cache").unwrap().unwrap();
        let err = cache.u64("ttl_s").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cache.ttl_s: must be a whole number, 0 or more"
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let doc = json!({"ttl_s": 1, "tll_s": 2});
        let obj = Object::new("cache", &doc).unwrap();
        let err = obj.refuse_unknown(&["ttl_s"]).unwrap_err();
        assert_eq!(err.field, "cache.tll_s");
    }

    #[test]
    fn null_reads_as_absent_but_stays_visible() {
        let doc = json!({"owner": null});
        let obj = Object::new("", &doc).unwrap();
        assert_eq!(obj.string("owner").unwrap(), None);
        assert_eq!(obj.value("owner"), Some(&Value::Null));
    }

    #[test]
    fn list_items_are_checked() {
        let doc = json!({"scopes": ["a", 3]});
        let obj = Object::new("rules[0]", &doc).unwrap();
        assert_eq!(
            obj.string_list("scopes").unwrap_err().field,
            "rules[0].scopes[1]"
        );
    }

    #[test]
    fn ranges_are_enforced() {
        let doc = json!({"n": 0});
        let obj = Object::new("", &doc).unwrap();
        assert!(obj.u64_in("n", 5, 1, 10).is_err());
        assert_eq!(obj.u64_in("m", 5, 1, 10).unwrap(), 5);
    }
}
