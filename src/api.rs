//! The generated `stepgate.v1` gRPC types (from `proto/stepgate/v1/*.proto`, compiled by build.rs).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("stepgate.v1");
}

/// Encoded `FileDescriptorSet` of stepgate's own protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stepgate_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `envoy.service.auth.v3` and its imports (from the protos the
/// envoy-types package ships), so reflection describes `Check` too.
pub const ENVOY_AUTH_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_auth_descriptor.bin"));

/// JSON object → `google.protobuf.Struct` (numbers become doubles, as Struct has no integers).
pub fn json_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    use prost_types::{ListValue, Value, value::Kind};
    fn value(v: &serde_json::Value) -> Value {
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => Kind::ListValue(ListValue {
                values: a.iter().map(value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(json_to_struct(o)),
        };
        Value { kind: Some(kind) }
    }
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

/// `google.protobuf.Struct` → JSON object (a non-finite number becomes null).
pub fn struct_to_json(s: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    use prost_types::value::Kind;
    use serde_json::{Number, Value};
    fn value(v: prost_types::Value) -> Value {
        match v.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::NumberValue(n)) => Number::from_f64(n).map_or(Value::Null, Value::Number),
            Some(Kind::StringValue(s)) => Value::String(s),
            Some(Kind::BoolValue(b)) => Value::Bool(b),
            Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
            Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value).collect()),
        }
    }
    s.fields.into_iter().map(|(k, v)| (k, value(v))).collect()
}
