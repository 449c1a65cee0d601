//! Whether a payload that went through an SDK's decoder and encoder is
//! still the same value.
//!
//! Where a subject may re-encode (a call out's payload, an event's), the
//! bytes may change and the value must not: an integer keeps its value
//! whatever its width (beyond 2⁵³ too), a float its value whether written
//! as float 32 or 64, bin stays bin (not str), a map keeps its entries in
//! any order (a Go map has none).

use rmpv::Value;

/// `None` when `got` is the same value as `want`, else where and how it
/// differs (a path like `$["nested"][2]`).
pub fn difference(want: &Value, got: &Value) -> Option<String> {
    diff_at("$", want, got)
}

fn diff_at(path: &str, want: &Value, got: &Value) -> Option<String> {
    let differs = || Some(format!("{path}: want {}, got {}", show(want), show(got)));
    match (want, got) {
        (Value::Integer(a), Value::Integer(b)) => (int(a) != int(b)).then(differs).flatten(),
        (Value::F32(_) | Value::F64(_), Value::F32(_) | Value::F64(_)) => {
            let (a, b) = (float(want), float(got));
            let same = a == b || (a.is_nan() && b.is_nan());
            (!same).then(differs).flatten()
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Some(format!(
                    "{path}: want an array of {}, got one of {}",
                    a.len(),
                    b.len()
                ));
            }
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (a, b))| diff_at(&format!("{path}[{i}]"), a, b))
        }
        (Value::Map(a), Value::Map(b)) => {
            if a.len() != b.len() {
                return Some(format!(
                    "{path}: want a map of {} entries, got one of {}",
                    a.len(),
                    b.len()
                ));
            }
            a.iter().find_map(|(key, value)| {
                let at = format!("{path}[{}]", key_text(key));
                match b.iter().find(|(k, _)| difference(key, k).is_none()) {
                    Some((_, other)) => diff_at(&at, value, other),
                    None => Some(format!("{at}: missing")),
                }
            })
        }
        _ => (want != got).then(differs).flatten(),
    }
}

fn int(i: &rmpv::Integer) -> Option<i128> {
    i.as_u64()
        .map(i128::from)
        .or_else(|| i.as_i64().map(i128::from))
}

fn float(v: &Value) -> f64 {
    match v {
        Value::F32(f) => f64::from(*f),
        Value::F64(f) => *f,
        _ => f64::NAN,
    }
}

/// A map key in a path: a str as quoted text, anything else shown.
fn key_text(key: &Value) -> String {
    match key.as_str() {
        Some(s) => format!("{s:?}"),
        None => show(key),
    }
}

/// A short rendering of a value: its kind, and what it holds when short.
fn show(v: &Value) -> String {
    let text = match v {
        Value::Binary(b) => format!("bin {}", super::corpus::hex_prefix(b, 8)),
        Value::String(s) => match s.as_str() {
            Some(s) => format!("str {s:?}"),
            None => "str (not UTF-8)".to_owned(),
        },
        Value::Array(a) => format!("array of {}", a.len()),
        Value::Map(m) => format!("map of {}", m.len()),
        other => other.to_string(),
    };
    let mut short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    #[test]
    fn widths_and_orders_do_not_matter() {
        let want = map(vec![
            ("a", Value::from(u64::MAX)),
            ("b", Value::F32(1.5)),
            ("c", Value::Array(vec![Value::from(-1), Value::Nil])),
        ]);
        let got = map(vec![
            ("c", Value::Array(vec![Value::from(-1i64), Value::Nil])),
            ("b", Value::F64(1.5)),
            ("a", Value::from(u64::MAX)),
        ]);
        assert_eq!(difference(&want, &got), None);
        assert_eq!(
            difference(&Value::F64(f64::NAN), &Value::F32(f32::NAN)),
            None
        );
    }

    #[test]
    fn values_that_changed_are_named_by_their_path() {
        let want = map(vec![(
            "n",
            Value::Array(vec![Value::from(9_007_199_254_740_993u64)]),
        )]);
        // What a float 64 makes of 2^53+1.
        let got = map(vec![(
            "n",
            Value::Array(vec![Value::F64(9_007_199_254_740_992.0)]),
        )]);
        assert_eq!(
            difference(&want, &got).as_deref(),
            Some("$[\"n\"][0]: want 9007199254740993, got 9007199254740992")
        );
        let bin = Value::Binary(b"ab".to_vec());
        assert_eq!(
            difference(&bin, &Value::from("ab")).as_deref(),
            Some("$: want bin 61 62, got str \"ab\"")
        );
        assert_eq!(
            difference(&map(vec![("a", Value::Nil)]), &map(vec![("b", Value::Nil)])).as_deref(),
            Some("$[\"a\"]: missing")
        );
        assert!(difference(&Value::from(1), &Value::from(2)).is_some());
        assert!(difference(&Value::Array(vec![Value::Nil]), &Value::Array(vec![])).is_some());
    }
}
