//! A wrapper that makes it impossible to format a raw value into a message by accident.

use std::fmt;

/// A value taken from an event. `Debug` and `Display` print only `<redacted N bytes>`, so a
/// `Sensitive` can travel through error types and logs without leaking what it holds.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Sensitive<T>(T);

impl<T> Sensitive<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The raw value. Call sites that expose it must not log or format it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T: AsRef<[u8]>> fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.as_ref().len())
    }
}

impl<T: AsRef<[u8]>> fmt::Display for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let secret = Sensitive::new("908-87-2346".to_string());
        assert_eq!(format!("{secret}"), "<redacted 11 bytes>");
        assert_eq!(format!("{secret:?}"), "<redacted 11 bytes>");
        assert_eq!(secret.expose(), "908-87-2346");
    }
}
