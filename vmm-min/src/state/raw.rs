//! `#[serde(with = "raw")]` for KVM structures: their bytes as one lowercase hex string instead
//! of kvm-bindings' default (a JSON array of byte numbers). The state is parsed inside the
//! migration downtime, and a hex string parses several times faster than thousands of numbers.
//! Any type whose `Serialize` is a single `serialize_bytes` (kvm-bindings' `serde` feature) and
//! whose `Deserialize` accepts bytes works.

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::{Error as _, Impossible};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Captures the bytes of a value that serializes as bytes.
struct Capture;

#[derive(Debug)]
struct NotBytes(String);

impl std::fmt::Display for NotBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotBytes {}

impl serde::ser::Error for NotBytes {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        NotBytes(msg.to_string())
    }
}

macro_rules! refuse {
    ($($name:ident($($t:ty),*)),* $(,)?) => {
        $(fn $name(self, $(_: $t),*) -> Result<Self::Ok, Self::Error> {
            Err(NotBytes(concat!("raw: not bytes (", stringify!($name), ")").into()))
        })*
    };
}

impl Serializer for Capture {
    type Ok = Vec<u8>;
    type Error = NotBytes;
    type SerializeSeq = Impossible<Vec<u8>, NotBytes>;
    type SerializeTuple = Impossible<Vec<u8>, NotBytes>;
    type SerializeTupleStruct = Impossible<Vec<u8>, NotBytes>;
    type SerializeTupleVariant = Impossible<Vec<u8>, NotBytes>;
    type SerializeMap = Impossible<Vec<u8>, NotBytes>;
    type SerializeStruct = Impossible<Vec<u8>, NotBytes>;
    type SerializeStructVariant = Impossible<Vec<u8>, NotBytes>;

    fn serialize_bytes(self, v: &[u8]) -> Result<Vec<u8>, NotBytes> {
        Ok(v.to_vec())
    }

    refuse!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<Vec<u8>, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (some)"))
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<Vec<u8>, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (newtype)"))
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Vec<u8>, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (newtype variant)"))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (seq)"))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (tuple)"))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (tuple struct)"))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (tuple variant)"))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (map)"))
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (struct)"))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotBytes> {
        Err(NotBytes::custom("raw: not bytes (struct variant)"))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 15)]));
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Serializes `v` (a bytes-serializing type) as a hex string.
pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    let bytes = v.serialize(Capture).map_err(S::Error::custom)?;
    s.serialize_str(&to_hex(&bytes))
}

/// Reads a hex string back into `T`.
pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    let bytes = from_hex(&s).ok_or_else(|| D::Error::custom("raw: not a hex string"))?;
    T::deserialize(serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(&bytes))
        .map_err(D::Error::custom)
}

/// [`serialize`]/[`deserialize`] for an `Option`.
pub mod opt {
    use super::*;

    /// `None` as null, `Some` as a hex string.
    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    /// Null or a hex string.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        let Some(s) = s else { return Ok(None) };
        let bytes = from_hex(&s).ok_or_else(|| D::Error::custom("raw: not a hex string"))?;
        T::deserialize(serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(&bytes))
            .map(Some)
            .map_err(D::Error::custom)
    }
}

/// A `Vec<u32>` (the XSAVE area) as the hex string of its little-endian bytes.
pub mod words {
    use super::*;

    /// Little-endian bytes as hex.
    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|w| w.to_le_bytes()).collect();
        s.serialize_str(&to_hex(&bytes))
    }

    /// Hex of a multiple of 4 bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = from_hex(&s).ok_or_else(|| D::Error::custom("raw: not a hex string"))?;
        if !bytes.len().is_multiple_of(4) {
            return Err(D::Error::custom("raw: not a whole number of 32-bit words"));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod t {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct S {
        #[serde(with = "super")]
        regs: kvm_bindings::kvm_regs,
        #[serde(with = "super::opt")]
        lapic: Option<kvm_bindings::kvm_lapic_state>,
        #[serde(with = "super::opt")]
        none: Option<kvm_bindings::kvm_lapic_state>,
        #[serde(with = "super::words")]
        xsave: Vec<u32>,
    }

    #[test]
    fn kvm_structures_round_trip_as_hex_and_bad_hex_is_refused() {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        lapic.regs[1023] = -1;
        let s = S {
            regs: kvm_bindings::kvm_regs {
                rax: 0x1122_3344_5566_7788,
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
            lapic: Some(lapic),
            none: None,
            xsave: vec![1, 0xdead_beef, 0],
        };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"xsave\":\"01000000efbeadde00000000\""), "{j}");
        assert!(j.len() < 3000, "{j}");
        let back: S = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        for bad in ["\"0g\"", "\"012\"", "[1,2]"] {
            let j = format!(r#"{{"regs":{bad},"lapic":null,"none":null,"xsave":""}}"#);
            assert!(serde_json::from_str::<S>(&j).is_err(), "{j}");
        }
    }
}
