//! Checks objects against a CustomResourceDefinition's OpenAPI v3 schema, the way the API server
//! would before storing them: types, required fields, enums, patterns, lengths, bounds, item and
//! property counts, unknown fields (which the server would silently prune, so they are reported
//! here), `format: int32`, `x-kubernetes-list-type: map` keys, and the CEL rules the CRD carries.
//!
//! CEL is not interpreted in general: the rules kvgate's CRDs use are recognised by their text and
//! checked natively. An unrecognised rule is an error of the schema, never silently skipped, so a
//! newer CRD with a new rule fails loudly until the rule is taught here.

use serde_json::Value;
use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot parse the CRD: {0}")]
    Parse(String),
    #[error("the CRD has no served version {0:?} with an openAPIV3Schema")]
    NoVersion(String),
}

/// One way an object breaks the schema: where (a JSON path like `.spec.targetPorts[1].number`) and
/// what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "."
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)
    }
}

/// The schema of one version of one CRD.
#[derive(Clone, Debug)]
pub struct CrdSchema {
    pub group: String,
    pub kind: String,
    pub version: String,
    root: Value,
}

impl CrdSchema {
    /// Reads a CRD (YAML or JSON) and takes the schema of `version`.
    pub fn from_crd(text: &str, version: &str) -> Result<Self, SchemaError> {
        let crd: Value =
            serde_yaml_ng::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default().to_string();
        let kind = spec["names"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let root = spec["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == version && v["served"] != false)
            .map(|v| v["schema"]["openAPIV3Schema"].clone())
            .filter(Value::is_object)
            .ok_or_else(|| SchemaError::NoVersion(version.to_string()))?;
        Ok(Self {
            group,
            kind,
            version: version.to_string(),
            root,
        })
    }

    /// Every violation of `obj` against the schema (empty when it is valid), plus a check of its
    /// `apiVersion` and `kind`.
    pub fn validate(&self, obj: &Value) -> Vec<Violation> {
        let mut out = Vec::new();
        let api_version = format!("{}/{}", self.group, self.version);
        if obj["apiVersion"] != api_version.as_str() {
            out.push(Violation {
                path: ".apiVersion".into(),
                message: format!("is {}, expected {api_version:?}", obj["apiVersion"]),
            });
        }
        if obj["kind"] != self.kind.as_str() {
            out.push(Violation {
                path: ".kind".into(),
                message: format!("is {}, expected {:?}", obj["kind"], self.kind),
            });
        }
        check(&self.root, obj, "", &mut out);
        out
    }
}

fn push(out: &mut Vec<Violation>, path: &str, message: impl Into<String>) {
    out.push(Violation {
        path: path.to_string(),
        message: message.into(),
    });
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &Value, v: &Value, path: &str, out: &mut Vec<Violation>) {
    if let Some(t) = schema["type"].as_str() {
        let actual = type_name(v);
        let ok = actual == t || (t == "number" && actual == "integer");
        if !ok {
            push(out, path, format!("must be of type {t}, found {actual}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        push(
            out,
            path,
            format!("{v} is not one of {}", Value::from(allowed.clone())),
        );
    }
    match v {
        Value::String(s) => check_string(schema, s, path, out),
        Value::Number(_) => check_number(schema, v, path, out),
        Value::Array(items) => check_array(schema, items, path, out),
        Value::Object(map) => check_object(schema, map, path, out),
        _ => {}
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for r in rules {
            check_rule(schema, r, v, path, out);
        }
    }
}

fn check_string(schema: &Value, s: &str, path: &str, out: &mut Vec<Violation>) {
    let len = s.chars().count() as u64;
    if let Some(min) = schema["minLength"].as_u64()
        && len < min
    {
        push(out, path, format!("is shorter than {min} characters"));
    }
    if let Some(max) = schema["maxLength"].as_u64()
        && len > max
    {
        push(out, path, format!("is longer than {max} characters"));
    }
    if let Some(p) = schema["pattern"].as_str() {
        match regex::Regex::new(p) {
            Ok(re) if re.is_match(s) => {}
            Ok(_) => push(out, path, format!("{s:?} does not match {p:?}")),
            Err(e) => push(
                out,
                path,
                format!("the schema's pattern {p:?} does not compile: {e}"),
            ),
        }
    }
}

fn check_number(schema: &Value, v: &Value, path: &str, out: &mut Vec<Violation>) {
    let Some(x) = v.as_f64() else { return };
    if let Some(min) = schema["minimum"].as_f64()
        && x < min
    {
        push(out, path, format!("{v} is below the minimum {min}"));
    }
    if let Some(max) = schema["maximum"].as_f64()
        && x > max
    {
        push(out, path, format!("{v} is above the maximum {max}"));
    }
    if schema["format"] == "int32" && v.as_i64().is_none_or(|i| i32::try_from(i).is_err()) {
        push(out, path, format!("{v} does not fit in int32"));
    }
}

fn check_array(schema: &Value, items: &[Value], path: &str, out: &mut Vec<Violation>) {
    let n = items.len() as u64;
    if let Some(min) = schema["minItems"].as_u64()
        && n < min
    {
        push(out, path, format!("has {n} items, at least {min} required"));
    }
    if let Some(max) = schema["maxItems"].as_u64()
        && n > max
    {
        push(out, path, format!("has {n} items, at most {max} allowed"));
    }
    if schema["items"].is_object() {
        for (i, item) in items.iter().enumerate() {
            check(&schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    // A list of type map: the key fields identify an item, so they must be unique together.
    if schema["x-kubernetes-list-type"] == "map"
        && let Some(keys) = schema["x-kubernetes-list-map-keys"].as_array()
    {
        let mut seen = std::collections::HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let key: Vec<String> = keys
                .iter()
                .map(|k| item[k.as_str().unwrap_or_default()].to_string())
                .collect();
            if !seen.insert(key.clone()) {
                push(
                    out,
                    &format!("{path}[{i}]"),
                    format!("duplicate map-list key {}", key.join("/")),
                );
            }
        }
    }
}

fn check_object(
    schema: &Value,
    map: &serde_json::Map<String, Value>,
    path: &str,
    out: &mut Vec<Violation>,
) {
    let n = map.len() as u64;
    if let Some(min) = schema["minProperties"].as_u64()
        && n < min
    {
        push(
            out,
            path,
            format!("has {n} entries, at least {min} required"),
        );
    }
    if let Some(max) = schema["maxProperties"].as_u64()
        && n > max
    {
        push(out, path, format!("has {n} entries, at most {max} allowed"));
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        let Some(name) = r.as_str() else { continue };
        if !map.contains_key(name) {
            push(out, path, format!("required field {name:?} is missing"));
        }
    }
    let props = schema["properties"].as_object();
    let additional = &schema["additionalProperties"];
    // An object schema with neither properties nor additionalProperties (metadata) takes any
    // fields; so does one marked to preserve unknown fields.
    let open = (props.is_none() && additional.is_null())
        || schema["x-kubernetes-preserve-unknown-fields"] == true;
    for (k, v) in map {
        let child = format!("{path}.{k}");
        match props.and_then(|p| p.get(k)) {
            Some(s) => check(s, v, &child, out),
            None if additional.is_object() => check(additional, v, &child, out),
            None if open || *additional == true => {}
            None => push(
                out,
                &child,
                "is not in the schema (the API server would prune it)",
            ),
        }
    }
}

/// The CEL rules kvgate's CRDs carry, checked natively.
fn check_rule(schema: &Value, rule: &Value, v: &Value, path: &str, out: &mut Vec<Violation>) {
    let text = rule["rule"].as_str().unwrap_or_default();
    let message = rule["message"].as_str().unwrap_or(text);
    let ok = match text {
        // endpointPickerRef: a Service reference needs a port (kind defaults to Service).
        "self.kind != 'Service' || has(self.port)" => {
            let kind = v["kind"]
                .as_str()
                .or_else(|| schema["properties"]["kind"]["default"].as_str())
                .unwrap_or("Service");
            kind != "Service" || v.get("port").is_some()
        }
        // targetPorts: numbers unique.
        "self.all(p1, self.exists_one(p2, p1.number==p2.number))" => {
            let numbers: Vec<&Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| &p["number"])
                .collect();
            numbers
                .iter()
                .all(|a| numbers.iter().filter(|b| *b == a).count() == 1)
        }
        other => {
            push(
                out,
                path,
                format!("the schema's CEL rule {other:?} is not supported by this checker"),
            );
            return;
        }
    };
    if !ok {
        push(out, path, message.to_string());
    }
}
