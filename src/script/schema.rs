//! A TorchScript method's signature as libtorch records it, and the check that a call by name
//! matches it.
//!
//! `torch.jit.trace` names and orders a traced submodule's arguments by the order the trace
//! first used them, not by the Python signature: a block declared `forward(h, ctx, temb, rope)`
//! can come out as `forward(temb, h, ...)`. The schema is the only reliable account, which is why
//! [`ScriptModule::call_named`](super::ScriptModule::call_named) matches arguments by name.

use crate::error::{Error, Result};
use std::fmt;
use tch::IValue;

/// One argument (or return value) of a TorchScript method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// The argument's name (empty for most return values).
    pub name: String,
    /// Its TorchScript type, as TorchScript writes it: `Tensor`, `Tuple[Tensor, Tensor]`,
    /// `Optional[Tensor]`, `int`, `List[Tensor]`.
    pub type_str: String,
    /// Its default value as libtorch prints it, when it has one.
    pub default: Option<String>,
}

impl Arg {
    /// True when a call may leave this argument out.
    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.name[..], &self.default) {
            ("", _) => f.write_str(&self.type_str),
            (n, None) => write!(f, "{n}: {}", self.type_str),
            (n, Some(d)) => write!(f, "{n}: {} = {d}", self.type_str),
        }
    }
}

/// The signature of one method: its arguments in the order a positional call passes them
/// (without `self`), and its return values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSchema {
    /// The method's name (`forward`).
    pub name: String,
    /// Arguments in call order, `self` left out.
    pub args: Vec<Arg>,
    /// Return values (one for a TorchScript method; a tuple return is one `Tuple[...]`).
    pub returns: Vec<Arg>,
}

impl MethodSchema {
    /// The argument names in call order.
    pub fn arg_names(&self) -> Vec<&str> {
        self.args.iter().map(|a| a.name.as_str()).collect()
    }

    /// The argument called `name`, if there is one.
    pub fn arg(&self, name: &str) -> Option<&Arg> {
        self.args.iter().find(|a| a.name == name)
    }

    fn described(&self) -> Vec<String> {
        self.args.iter().map(ToString::to_string).collect()
    }

    /// Checks a call by name: every name exists, none is given twice, and every argument
    /// without a default is given. Types are checked by libtorch when the call runs.
    pub(crate) fn check_named(&self, given: &[(&str, IValue)]) -> Result<()> {
        for (i, (name, _)) in given.iter().enumerate() {
            if self.arg(name).is_none() {
                return Err(Error::UnknownArgument {
                    method: self.name.clone(),
                    name: (*name).to_owned(),
                    expected: self.described(),
                });
            }
            if given[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::InvalidArgument {
                    op: "ScriptModule::call_named",
                    message: format!(
                        "argument {name:?} of {}() is given twice; pass each name once",
                        self.name
                    ),
                });
            }
        }
        if let Some(missing) = self
            .args
            .iter()
            .find(|a| !a.has_default() && !given.iter().any(|(n, _)| *n == a.name))
        {
            return Err(Error::MissingArgument {
                method: self.name.clone(),
                name: missing.name.clone(),
                expected: self.described(),
            });
        }
        Ok(())
    }
}

/// `forward(temb: Tensor, hidden_states: Tensor, ...) -> Tensor`.
impl fmt::Display for MethodSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        f.write_str(") -> ")?;
        match &self.returns[..] {
            [one] => f.write_str(&one.type_str),
            many => {
                let types: Vec<&str> = many.iter().map(|r| r.type_str.as_str()).collect();
                write!(f, "({})", types.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> MethodSchema {
        let arg = |n: &str, t: &str, d: Option<&str>| Arg {
            name: n.into(),
            type_str: t.into(),
            default: d.map(Into::into),
        };
        MethodSchema {
            name: "forward".into(),
            args: vec![
                arg("x", "Tensor", None),
                arg("rope", "Tuple[Tensor, Tensor]", None),
                arg("scale", "float", Some("1.")),
            ],
            returns: vec![arg("", "Tensor", None)],
        }
    }

    #[test]
    fn named_calls_are_checked_against_the_schema() {
        let s = schema();
        assert_eq!(
            s.to_string(),
            "forward(x: Tensor, rope: Tuple[Tensor, Tensor], scale: float = 1.) -> Tensor"
        );
        let ok = [("rope", IValue::None), ("x", IValue::None)];
        s.check_named(&ok).unwrap();
        match s.check_named(&[("x", IValue::None), ("y", IValue::None)]) {
            Err(e @ Error::UnknownArgument { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains("\"y\"") && m.contains("rope: Tuple[Tensor, Tensor]"),
                    "{m}"
                )
            }
            r => panic!("expected UnknownArgument, got {r:?}"),
        }
        match s.check_named(&[("x", IValue::None)]) {
            Err(Error::MissingArgument { name, .. }) => assert_eq!(name, "rope"),
            r => panic!("expected MissingArgument, got {r:?}"),
        }
        assert!(matches!(
            s.check_named(&[
                ("x", IValue::None),
                ("rope", IValue::None),
                ("x", IValue::None)
            ]),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
