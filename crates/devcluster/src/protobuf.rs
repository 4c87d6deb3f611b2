//! Just enough of Kubernetes' protobuf encoding to accept what kubectl's typed
//! clients send for built-ins (`kubectl create namespace|secret|configmap|serviceaccount|token`):
//! the `k8s\0` envelope (`runtime.Unknown`) around a Namespace, Secret, ConfigMap,
//! ServiceAccount or TokenRequest.
//! Everything else is JSON; responses are always JSON (clients accept it).

use super::status::ApiError;
use base64::Engine;
use serde_json::{Map, Value};

/// Media type of Kubernetes protobuf bodies.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bytes,
    Bool,
    Int,
    RepeatedStr,
    RepeatedMessage(&'static [Field]),
    MapStr,
    MapBytes,
    Message(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field {
    number: u64,
    name: &'static str,
    kind: Kind,
}

const fn f(number: u64, name: &'static str, kind: Kind) -> Field {
    Field { number, name, kind }
}

const OBJECT_META: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "generateName", Kind::Str),
    f(3, "namespace", Kind::Str),
    f(11, "labels", Kind::MapStr),
    f(12, "annotations", Kind::MapStr),
    f(14, "finalizers", Kind::RepeatedStr),
];
const SECRET: &[Field] = &[
    f(1, "metadata", Kind::Message(OBJECT_META)),
    f(2, "data", Kind::MapBytes),
    f(3, "type", Kind::Str),
    f(4, "stringData", Kind::MapStr),
    f(5, "immutable", Kind::Bool),
];
const CONFIG_MAP: &[Field] = &[
    f(1, "metadata", Kind::Message(OBJECT_META)),
    f(2, "data", Kind::MapStr),
    f(3, "binaryData", Kind::MapBytes),
    f(4, "immutable", Kind::Bool),
];
const NAMESPACE_SPEC: &[Field] = &[f(1, "finalizers", Kind::RepeatedStr)];
const NAMESPACE: &[Field] = &[
    f(1, "metadata", Kind::Message(OBJECT_META)),
    f(2, "spec", Kind::Message(NAMESPACE_SPEC)),
];
const OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(2, "namespace", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(5, "apiVersion", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "fieldPath", Kind::Str),
];
const LOCAL_OBJECT_REFERENCE: &[Field] = &[f(1, "name", Kind::Str)];
const SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Kind::Message(OBJECT_META)),
    f(2, "secrets", Kind::RepeatedMessage(OBJECT_REFERENCE)),
    f(
        3,
        "imagePullSecrets",
        Kind::RepeatedMessage(LOCAL_OBJECT_REFERENCE),
    ),
    f(4, "automountServiceAccountToken", Kind::Bool),
];
const BOUND_OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(2, "apiVersion", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
];
const TOKEN_REQUEST_SPEC: &[Field] = &[
    f(1, "audiences", Kind::RepeatedStr),
    f(3, "boundObjectRef", Kind::Message(BOUND_OBJECT_REFERENCE)),
    f(4, "expirationSeconds", Kind::Int),
];
const TOKEN_REQUEST: &[Field] = &[
    f(1, "metadata", Kind::Message(OBJECT_META)),
    f(2, "spec", Kind::Message(TOKEN_REQUEST_SPEC)),
];
const TYPE_META: &[Field] = &[f(1, "apiVersion", Kind::Str), f(2, "kind", Kind::Str)];
const UNKNOWN: &[Field] = &[
    f(1, "typeMeta", Kind::Message(TYPE_META)),
    f(2, "raw", Kind::Bytes),
];

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn malformed() -> ApiError {
    ApiError::bad_request("the protobuf request body is malformed")
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or_else(malformed)?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed())
    }

    fn chunk(&mut self) -> Result<&'a [u8], ApiError> {
        let len = usize::try_from(self.varint()?).map_err(|_| malformed())?;
        let end = self
            .at
            .checked_add(len)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(malformed)?;
        let chunk = &self.bytes[self.at..end];
        self.at = end;
        Ok(chunk)
    }

    fn skip(&mut self, wire: u64) -> Result<(), ApiError> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.chunk().map(|_| ()),
            5 => self.advance(4),
            _ => Err(malformed()),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), ApiError> {
        if self.at + n > self.bytes.len() {
            return Err(malformed());
        }
        self.at += n;
        Ok(())
    }
}

fn text(bytes: &[u8]) -> Result<Value, ApiError> {
    String::from_utf8(bytes.to_vec())
        .map(Value::String)
        .map_err(|_| malformed())
}

fn map_entry(bytes: &[u8], binary: bool) -> Result<(String, Value), ApiError> {
    let mut reader = Reader { bytes, at: 0 };
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    while reader.at < bytes.len() {
        let tag = reader.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => {
                key = text(reader.chunk()?)?
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
            (2, 2) => {
                let raw = reader.chunk()?;
                value = if binary {
                    base64::engine::general_purpose::STANDARD.encode(raw).into()
                } else {
                    text(raw)?
                };
            }
            (_, wire) => reader.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn decode(bytes: &[u8], fields: &[Field]) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let mut reader = Reader { bytes, at: 0 };
    while reader.at < bytes.len() {
        let tag = reader.varint()?;
        let (number, wire) = (tag >> 3, tag & 7);
        let Some(field) = fields.iter().find(|f| f.number == number) else {
            reader.skip(wire)?;
            continue;
        };
        let name = field.name.to_string();
        match field.kind {
            Kind::Str => {
                out.insert(name, text(reader.chunk()?)?);
            }
            Kind::Bytes => {
                let raw = reader.chunk()?;
                out.insert(
                    name,
                    base64::engine::general_purpose::STANDARD.encode(raw).into(),
                );
            }
            Kind::Bool => {
                out.insert(name, (reader.varint()? != 0).into());
            }
            Kind::Int => {
                // int64 fields are two's-complement varints.
                out.insert(name, (reader.varint()? as i64).into());
            }
            Kind::RepeatedStr => {
                let item = text(reader.chunk()?)?;
                if let Value::Array(items) =
                    out.entry(name).or_insert_with(|| Value::Array(Vec::new()))
                {
                    items.push(item);
                }
            }
            Kind::MapStr | Kind::MapBytes => {
                let (key, value) =
                    map_entry(reader.chunk()?, matches!(field.kind, Kind::MapBytes))?;
                if let Value::Object(map) =
                    out.entry(name).or_insert_with(|| Value::Object(Map::new()))
                {
                    map.insert(key, value);
                }
            }
            Kind::Message(inner) => {
                out.insert(name, Value::Object(decode(reader.chunk()?, inner)?));
            }
            Kind::RepeatedMessage(inner) => {
                let item = Value::Object(decode(reader.chunk()?, inner)?);
                if let Value::Array(items) =
                    out.entry(name).or_insert_with(|| Value::Array(Vec::new()))
                {
                    items.push(item);
                }
            }
        }
    }
    Ok(out)
}

/// Decode a protobuf body into the JSON object it stands for.
pub fn to_json(body: &[u8]) -> Result<Value, ApiError> {
    let envelope = body.strip_prefix(MAGIC).ok_or_else(malformed)?;
    let unknown = decode(envelope, UNKNOWN)?;
    let api_version = unknown
        .get("typeMeta")
        .and_then(|t| t["apiVersion"].as_str())
        .unwrap_or_default()
        .to_string();
    let kind = unknown
        .get("typeMeta")
        .and_then(|t| t["kind"].as_str())
        .unwrap_or_default()
        .to_string();
    let raw = unknown
        .get("raw")
        .and_then(Value::as_str)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_default();
    let fields = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Secret") => SECRET,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("authentication.k8s.io/v1", "TokenRequest") => TOKEN_REQUEST,
        _ => {
            return Err(ApiError::unsupported_media_type(&format!(
                "{MEDIA_TYPE} for {api_version} {kind}; send JSON"
            )));
        }
    };
    let mut object = decode(&raw, fields)?;
    object.insert("apiVersion".into(), api_version.into());
    object.insert("kind".into(), kind.into());
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_secret_as_kubectl_sends_it() {
        let meta = [field(1, b"s1"), field(3, b"tmp")].concat();
        let entry = [field(1, b"a"), field(2, b"b")].concat();
        let secret = [field(1, &meta), field(2, &entry), field(3, b"Opaque")].concat();
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &secret)].concat();
        assert_eq!(
            to_json(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1", "namespace": "tmp"},
                "data": {"a": "Yg=="}, "type": "Opaque"})
        );
        assert!(to_json(b"k8s\0\x0a").is_err());
    }

    #[test]
    fn decodes_a_token_request_as_kubectl_sends_it() {
        let spec = [
            field(1, b"api://AzureADTokenExchange"),
            vec![4 << 3, 0xb0, 0x09],
        ]
        .concat();
        let request = [field(1, &field(1, b"sa")), field(2, &spec)].concat();
        let type_meta = [
            field(1, b"authentication.k8s.io/v1"),
            field(2, b"TokenRequest"),
        ]
        .concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &request)].concat();
        assert_eq!(
            to_json(&body).unwrap(),
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "metadata": {"name": "sa"},
                "spec": {"audiences": ["api://AzureADTokenExchange"], "expirationSeconds": 1200}})
        );
    }
}
