//! Choices named on the command line and in files (`--weights fp8`, `--dtype bf16`): one table
//! of `(name, value)` pairs per enum serves both parsing and printing, so the two cannot drift
//! and every unknown name gets the same error, listing what is accepted.

use anyhow::{bail, Result};

/// The value `s` names in `table`; an unknown name is an error `unknown WHAT "s": expected
/// a, b or c`.
pub fn parse<T: Copy>(what: &str, table: &[(&str, T)], s: &str) -> Result<T> {
    if let Some(&(_, v)) = table.iter().find(|(n, _)| *n == s) {
        return Ok(v);
    }
    let names: Vec<&str> = table.iter().map(|&(n, _)| n).collect();
    let expected = match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "nothing".to_string(),
    };
    bail!("unknown {what} {s:?}: expected {expected}")
}

/// The name of `v` in `table` (`"?"` for a value the table lacks, which a complete table
/// never meets).
pub fn name_of<T: PartialEq>(table: &[(&'static str, T)], v: &T) -> &'static str {
    table.iter().find(|(_, x)| x == v).map_or("?", |&(n, _)| n)
}

/// `FromStr` (through [`parse`], naming the choice `$what` in errors) and `Display` (through
/// [`name_of`]) for an enum with the name table `$table`.
macro_rules! named_enum {
    ($t:ty, $what:expr, $table:expr) => {
        impl std::str::FromStr for $t {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> anyhow::Result<Self> {
                $crate::names::parse($what, $table, s)
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::names::name_of($table, self))
            }
        }
    };
}
pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[(&str, u8)] = &[("a", 1), ("b", 2), ("c", 3)];

    #[test]
    fn parse_and_name_round_trip() {
        for &(n, v) in T {
            assert_eq!(parse("letter", T, n).unwrap(), v);
            assert_eq!(name_of(T, &v), n);
        }
        assert_eq!(name_of(T, &9), "?");
    }

    #[test]
    fn unknown_names_list_the_choices() {
        let e = parse("letter", T, "d").unwrap_err().to_string();
        assert_eq!(e, "unknown letter \"d\": expected a, b or c");
        let e = parse("one", &T[..1], "x").unwrap_err().to_string();
        assert_eq!(e, "unknown one \"x\": expected a");
    }
}
