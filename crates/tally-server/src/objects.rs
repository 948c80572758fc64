//! JSON objects only where a struct is read.
//!
//! serde's derived `Deserialize` for a struct also takes a sequence and fills
//! the fields in their order of declaration, and serde_json hands it one: so
//! `"from": ["acme", null]` read as `{"customer_id": "acme", "member_id":
//! null}`, and `["ev_1", "acme", "email_lookup", 2]` as an event. Which place
//! means which field is the order of a Rust struct's fields, not part of the
//! API, and reordering them would have swapped `from` and `to`.
//!
//! [`ObjectsOnly`] wraps a deserializer, at every depth, so that a struct
//! given anything but an object is refused ("invalid type: sequence,
//! expected a JSON object"). Everything else passes through unchanged
//! (arrays where a list is expected, serde_json's exact numbers).
//!
//! Not covered: what serde buffers before reading it (internally tagged
//! and untagged enums, `#[serde(flatten)]`) is read back through serde's own
//! content deserializer, which this does not wrap, so a struct inside one
//! still takes an array. No request type has one; a new one that does
//! needs its own check.

use std::fmt;

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Unexpected, VariantAccess,
    Visitor,
};

/// A deserializer whose structs take only objects, at every depth.
pub struct ObjectsOnly<D>(pub D);

/// Read a `T` from a whole JSON document whose structs take only objects.
pub fn from_slice<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, serde_path_to_error::Error<serde_json::Error>> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(ObjectsOnly(&mut deserializer))?;
    // Trailing data after the document (`{...} {...}`) is refused.
    deserializer.end().map_err(|error| {
        serde_path_to_error::deserialize::<_, serde::de::IgnoredAny>(Ended(error)).unwrap_err()
    })?;
    Ok(value)
}

/// As [`from_slice`], without tracking the path (for the hot path: read
/// again with [`from_slice`] to name the field when this fails).
pub fn from_slice_untracked<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(ObjectsOnly(&mut deserializer))?;
    deserializer.end()?;
    Ok(value)
}

/// A deserializer that fails with the error it holds: turns `end()`'s error
/// into a `serde_path_to_error::Error` with an empty path.
struct Ended(serde_json::Error);

impl<'de> Deserializer<'de> for Ended {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// A visitor passed through [`ObjectsOnly`]: what it is handed is wrapped in
/// turn. `objects_only` refuses a sequence (the visitor of a struct).
struct Wrap<V> {
    inner: V,
    objects_only: bool,
}

impl<V> Wrap<V> {
    fn any(inner: V) -> Self {
        Wrap {
            inner,
            objects_only: false,
        }
    }
}

struct Seed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(ObjectsOnly(deserializer))
    }
}

macro_rules! forward_deserialize {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method(Wrap::any(visitor))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectsOnly<D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
        deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
        deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
        deserialize_option deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, Wrap::any(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, Wrap::any(visitor))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, Wrap::any(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_tuple_struct(name, len, Wrap::any(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let visitor = Wrap {
            inner: visitor,
            objects_only: true,
        };
        self.0.deserialize_struct(name, fields, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, Wrap::any(visitor))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident: $ty:ty)*) => {$(
        fn $method<E: serde::de::Error>(self, value: $ty) -> Result<V::Value, E> {
            self.inner.$method(value)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.objects_only {
            true => formatter.write_str("a JSON object"),
            false => self.inner.expecting(formatter),
        }
    }

    forward_visit! {
        visit_bool: bool visit_i8: i8 visit_i16: i16 visit_i32: i32 visit_i64: i64
        visit_i128: i128 visit_u8: u8 visit_u16: u16 visit_u32: u32 visit_u64: u64
        visit_u128: u128 visit_f32: f32 visit_f64: f64 visit_char: char
        visit_str: &str visit_borrowed_str: &'de str visit_string: String
        visit_bytes: &[u8] visit_borrowed_bytes: &'de [u8] visit_byte_buf: Vec<u8>
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(ObjectsOnly(deserializer))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(ObjectsOnly(deserializer))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if self.objects_only {
            return Err(serde::de::Error::invalid_type(Unexpected::Seq, &self));
        }
        self.inner.visit_seq(Seq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(Map(map))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(Enum(data))
    }
}

struct Seq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct Map<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Seed(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct Enum<A>(A);

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
    type Error = A::Error;
    type Variant = Variant<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(Seed(seed))?;
        Ok((value, Variant(variant)))
    }
}

struct Variant<A>(A);

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Wrap::any(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = Wrap {
            inner: visitor,
            objects_only: true,
        };
        self.0.struct_variant(fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Side {
        customer_id: String,
        member_id: Option<String>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Transfer {
        from: Side,
        to: Side,
        amounts: Vec<u32>,
        note: Option<Side>,
    }

    #[test]
    fn a_struct_takes_an_object_at_any_depth_and_lists_stay_lists() {
        let good = br#"{"from":{"customer_id":"a","member_id":null},"to":{"customer_id":"b","member_id":"m"},"amounts":[1,2],"note":{"customer_id":"c","member_id":null}}"#;
        let read: Transfer = super::from_slice(good).unwrap();
        assert_eq!(read.to.member_id.as_deref(), Some("m"));
        assert_eq!(read.amounts, [1, 2]);
        // serde_json alone reads them by position.
        let nested =
            br#"{"from":["a",null],"to":{"customer_id":"b","member_id":null},"amounts":[]}"#;
        assert!(serde_json::from_slice::<Transfer>(nested).is_ok());
        let error = super::from_slice::<Transfer>(nested).unwrap_err();
        assert_eq!(error.path().to_string(), "from");
        assert!(
            error
                .inner()
                .to_string()
                .starts_with("invalid type: sequence, expected a JSON object"),
            "{error}"
        );
        let in_option = br#"{"from":{"customer_id":"a","member_id":null},"to":{"customer_id":"b","member_id":null},"amounts":[],"note":["c",null]}"#;
        assert_eq!(
            super::from_slice::<Transfer>(in_option)
                .unwrap_err()
                .path()
                .to_string(),
            "note"
        );
        let top =
            br#"[{"customer_id":"a","member_id":null},{"customer_id":"b","member_id":null},[]]"#;
        assert!(super::from_slice::<Transfer>(top).is_err());
        // In a list of structs.
        assert!(
            super::from_slice::<Vec<Side>>(br#"[{"customer_id":"a","member_id":null}]"#).is_ok()
        );
        assert!(super::from_slice::<Vec<Side>>(br#"[["a",null]]"#).is_err());
        // Trailing data after the document.
        let trailing = br#"{"customer_id":"a","member_id":null} {}"#;
        assert!(super::from_slice::<Side>(trailing)
            .unwrap_err()
            .inner()
            .to_string()
            .starts_with("trailing characters"));
    }
}
