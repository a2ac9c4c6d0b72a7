//! Typed values the core works with. Raw strings from webhooks and files
//! become these at the edge, so the rest of the code cannot mix a chat id
//! with a business id or send a message the Market would refuse for length.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The Market's limit on a chat message, in Unicode code points.
pub const MAX_MESSAGE_CHARS: usize = 4096;

macro_rules! positive_id {
    ($name:ident, $what:literal) => {
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl $name {
            /// Parses a rendered id: digits only (surrounding whitespace
            /// allowed), at least 1, fits in an int64 as the API requires.
            pub fn parse(raw: &str) -> Result<Self, String> {
                let trimmed = raw.trim();
                match trimmed.parse::<i64>() {
                    Ok(n) if n >= 1 && !trimmed.starts_with('+') => Ok(Self(n)),
                    _ => Err(format!(
                        "{} must be a positive integer, got {:?}",
                        $what, raw
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

positive_id!(BusinessId, "business_id");
positive_id!(ChatId, "chat_id");

/// A chat message the Market accepts: 1 to 4096 code points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub fn parse(text: String) -> Result<Self, String> {
        let chars = text.chars().count();
        if chars == 0 {
            return Err(
                "the rendered message is empty (the Market needs 1 to 4096 characters)".into(),
            );
        }
        if chars > MAX_MESSAGE_CHARS {
            return Err(format!(
                "the rendered message has {chars} characters, over the Market's limit of {MAX_MESSAGE_CHARS}"
            ));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Where a delivery stands. See DESIGN.md "Delivery states".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Queued,
    Sending,
    Delivered,
    Held,
    Dead,
    Failed,
    Cancelled,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 7] = [
        Self::Queued,
        Self::Sending,
        Self::Delivered,
        Self::Held,
        Self::Dead,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Delivered => "delivered",
            Self::Held => "held",
            Self::Dead => "dead",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// States an operator may send again.
    pub fn is_retryable_by_operator(self) -> bool {
        matches!(self, Self::Failed | Self::Dead | Self::Cancelled)
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive_integers() {
        assert_eq!(ChatId::parse(" 42 ").unwrap(), ChatId(42));
        assert!(ChatId::parse("0").is_err());
        assert!(ChatId::parse("-3").is_err());
        assert!(ChatId::parse("+3").is_err());
        assert!(ChatId::parse("12a").is_err());
        assert!(BusinessId::parse("99999999999999999999").is_err());
    }

    #[test]
    fn message_length_is_counted_in_code_points() {
        assert!(MessageText::parse("я".repeat(4096)).is_ok());
        assert!(MessageText::parse("я".repeat(4097)).is_err());
        assert!(MessageText::parse(String::new()).is_err());
    }
}
