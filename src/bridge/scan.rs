//! Reading a JSON object that serde has already checked: its top-level fields, found by
//! skipping strings with `memchr` instead of parsing them again. A payload is checked once
//! when it is read ([`super::message::parse_chat`]); the signaling checks then need two fields
//! of an SDP description of a few KB, and a second serde pass over it was a tenth of the
//! bridge's instructions per signaling message (callgrind; BENCHMARKS.md).
//!
//! Given text that is not valid JSON, these functions still never panic; they may end early.

use super::message::Text;

/// The fields of `json`, a valid JSON object, in order: each key and value as JSON text (a
/// key with its quotes). `None` when `json` is not an object.
pub(super) fn fields(json: &str) -> Option<Fields<'_>> {
    let at = skip_space(json.as_bytes(), 0);
    (json.as_bytes().get(at) == Some(&b'{')).then_some(Fields { json, at: at + 1 })
}

pub(super) struct Fields<'a> {
    json: &'a str,
    /// Where the next field (or the comma before it) starts.
    at: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.json.as_bytes();
        let mut key = skip_space(b, self.at);
        if b.get(key) == Some(&b',') {
            key = skip_space(b, key + 1);
        }
        if b.get(key) != Some(&b'"') {
            return None; // `}`: the end
        }
        let key_end = skip_string(b, key)?;
        let colon = skip_space(b, key_end);
        if b.get(colon) != Some(&b':') {
            return None;
        }
        let value = skip_space(b, colon + 1);
        let value_end = skip_value(b, value)?;
        self.at = value_end;
        Some((
            self.json.get(key..key_end)?,
            self.json.get(value..value_end)?,
        ))
    }
}

/// Whether `json`, a JSON string's text, is the string `expected`.
pub(super) fn string_is(json: &str, expected: &str) -> bool {
    let Some(inner) = json.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return false;
    };
    match inner.contains('\\') {
        false => inner == expected,
        // Escaped (`"typ\u0065"`): decoded, rare.
        true => serde_json::from_str::<Text<'_>>(json).is_ok_and(|Text(s)| s == expected),
    }
}

/// Whether `json` is a JSON string's text.
pub(super) fn is_string(json: &str) -> bool {
    json.starts_with('"')
}

fn skip_space(b: &[u8], mut at: usize) -> usize {
    while b
        .get(at)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at += 1;
    }
    at
}

/// Past the string that starts (with its quote) at `at`.
fn skip_string(b: &[u8], at: usize) -> Option<usize> {
    let mut from = at + 1;
    loop {
        let found = from + memchr::memchr2(b'"', b'\\', b.get(from..)?)?;
        match b[found] {
            b'"' => return Some(found + 1),
            _ => from = found + 2, // an escape: `\"`, `\\` or the start of `\uXXXX`
        }
    }
}

/// Past the value that starts at `at`.
fn skip_value(b: &[u8], at: usize) -> Option<usize> {
    match b.get(at)? {
        b'"' => skip_string(b, at),
        b'{' | b'[' => {
            let (mut depth, mut i) = (0usize, at);
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, true, false or null: up to what follows it.
        _ => {
            let len = b[at..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'));
            Some(len.map_or(b.len(), |len| at + len))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_an_object_as_json_text() {
        let json =
            r#" { "a" : "x\"}y" , "b\u0022":{"c":[1,{"d":"]"}]},"e":-1.5e3,"f":null,"g":[] } "#;
        let got: Vec<_> = fields(json).unwrap().collect();
        assert_eq!(
            got,
            [
                (r#""a""#, r#""x\"}y""#),
                (r#""b\u0022""#, r#"{"c":[1,{"d":"]"}]}"#),
                (r#""e""#, "-1.5e3"),
                (r#""f""#, "null"),
                (r#""g""#, "[]"),
            ]
        );
        assert_eq!(fields("{}").unwrap().count(), 0);
        assert_eq!(fields(r#"{"a":"\\"}"#).unwrap().count(), 1);
        assert!(fields(r#"["a"]"#).is_none());
        assert!(fields(r#""{""#).is_none());
    }

    #[test]
    fn strings_compared_as_decoded() {
        assert!(string_is(r#""offer""#, "offer"));
        assert!(string_is(r#""off\u0065r""#, "offer"));
        assert!(!string_is(r#""offers""#, "offer"));
        assert!(!string_is("1", "1"));
        assert!(!string_is(r#""a"#, "a"));
    }

    #[test]
    fn text_that_is_not_json_ends_the_fields_without_a_panic() {
        let broken = [
            "{",
            r#"{""#,
            r#"{"a"#,
            r#"{"a""#,
            r#"{"a":"#,
            r#"{"a":""#,
            r#"{"a":"\"#,
            r#"{"a":{"#,
            r#"{"a":]}"#,
            r#"{"a" 1}"#,
            r#"{"a":1,"#,
            "{\"é\":\"ü",
        ];
        for text in broken {
            let _ = fields(text).map(Iterator::count);
        }
    }
}
