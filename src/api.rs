//! The generated `stepgate.v1` gRPC types (from `proto/stepgate/v1/*.proto`, compiled by build.rs).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("stepgate.v1");
}

/// The codec of stepgate's own services and clients: prost's, but a `DecideRequest` that does not
/// decode (a string field that is not UTF-8, a `Struct` nested past prost's depth limit) becomes a
/// request `Decide` answers with a DENY (`400 malformed_request`, naming what prost refused)
/// rather than a gRPC `INTERNAL` error: every request gets an OK status and an outcome, as the
/// proto promises. Other messages that do not decode are `INTERNAL`, as with prost's codec.
pub mod codec {
    use std::marker::PhantomData;

    use prost::{Message, bytes::Buf};
    use tonic::{
        Status,
        codec::{BufferSettings, DecodeBuf, Decoder},
    };

    use super::v1;

    /// Where an undecodable `DecideRequest` says so: the whole operation, one no client can have
    /// decided on (it starts with a NUL, a control character, which an operation is refused for
    /// anyway). A client sending it gets what a message that does not decode gets.
    pub const UNDECODABLE: &str = "\0undecodable";

    /// What a message that does not decode becomes: `None` for an error status.
    pub trait Undecodable: Sized {
        fn undecodable(_error: &prost::DecodeError) -> Option<Self> {
            None
        }
    }

    impl Undecodable for v1::DecideRequest {
        fn undecodable(error: &prost::DecodeError) -> Option<Self> {
            // What prost said names fields, but quoting it in the answer would also let a client
            // that sends the marker itself put its text there: kept to the debug log.
            tracing::debug!(%error, "a Decide message does not decode");
            Some(v1::DecideRequest {
                operation: UNDECODABLE.to_owned(),
                ..Default::default()
            })
        }
    }

    macro_rules! as_prost {
        ($($message:ident),* $(,)?) => { $(impl Undecodable for v1::$message {})* };
    }
    as_prost!(
        DecideResponse,
        BlockRequest,
        BlockResponse,
        UnblockRequest,
        UnblockResponse,
        ListBlocksRequest,
        ListBlocksResponse,
        RevokeRequest,
        RevokeResponse,
        GetRiskCountsRequest,
        GetRiskCountsResponse,
    );

    #[derive(Debug)]
    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Undecodable + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = tonic_prost::ProstEncoder<T>;
        type Decoder = LenientDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            tonic_prost::ProstEncoder::default()
        }

        fn decoder(&mut self) -> Self::Decoder {
            LenientDecoder(PhantomData)
        }
    }

    #[derive(Debug)]
    pub struct LenientDecoder<U>(PhantomData<U>);

    impl<U: Message + Default + Undecodable> Decoder for LenientDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            match U::decode(&mut *buf) {
                Ok(message) => Ok(Some(message)),
                Err(error) => {
                    // What prost left of the message is not the next one's.
                    buf.advance(buf.remaining());
                    U::undecodable(&error)
                        .map(Some)
                        .ok_or_else(|| Status::internal(error.to_string()))
                }
            }
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::default()
        }
    }
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

/// The values in `s` at every depth (each list and object one, and each of its items), and the
/// bytes of its keys and strings, counted until either passes its bound: `Err("values")` or
/// `Err("bytes")` then. Cheap next to converting them, which each value multiplies.
pub fn struct_within(
    s: &prost_types::Struct,
    max_values: usize,
    max_bytes: usize,
) -> Result<(), &'static str> {
    use prost_types::value::Kind;
    let (mut values, mut bytes) = (0usize, 0usize);
    let mut pending: Vec<&prost_types::Value> = Vec::new();
    let fields = |s: &'_ prost_types::Struct, values: &mut usize, bytes: &mut usize| {
        *values += s.fields.len();
        *bytes += s.fields.keys().map(String::len).sum::<usize>();
    };
    fields(s, &mut values, &mut bytes);
    pending.extend(s.fields.values());
    while let Some(value) = pending.pop() {
        if values > max_values {
            return Err("values");
        }
        if bytes > max_bytes {
            return Err("bytes");
        }
        match &value.kind {
            Some(Kind::StringValue(text)) => bytes += text.len(),
            Some(Kind::StructValue(inner)) => {
                fields(inner, &mut values, &mut bytes);
                pending.extend(inner.fields.values());
            }
            Some(Kind::ListValue(list)) => {
                values += list.values.len();
                pending.extend(&list.values);
            }
            _ => {}
        }
    }
    if values > max_values {
        Err("values")
    } else if bytes > max_bytes {
        Err("bytes")
    } else {
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes(json: serde_json::Value) -> prost_types::Struct {
        json_to_struct(json.as_object().expect("an object"))
    }

    #[test]
    fn every_value_at_every_depth_and_every_key_and_string_byte_counts() {
        // values: "a", "list", its 3 items, "o", its "k": 7; bytes: a list o k (7) + "xy" + "z".
        let s = attributes(serde_json::json!({
            "a": "xy",
            "list": [1, null, "z"],
            "o": { "k": true }
        }));
        assert_eq!(struct_within(&s, 7, 10), Ok(()));
        assert_eq!(struct_within(&s, 6, 10), Err("values"));
        assert_eq!(struct_within(&s, 7, 9), Err("bytes"));
        assert_eq!(
            struct_within(&attributes(serde_json::json!({})), 0, 0),
            Ok(())
        );
    }
}
