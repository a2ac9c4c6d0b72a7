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

/// What a Market chat is about, when the seller starts it: an order or a
/// return (`ChatContextIdentifiableType` in `chats.openapi.yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ContextKind {
    Order,
    Return,
}

impl ContextKind {
    /// The spelling the Market API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Order => "ORDER",
            Self::Return => "RETURN",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ORDER" => Some(Self::Order),
            "RETURN" => Some(Self::Return),
            _ => None,
        }
    }

    /// The route key that names it (`order_id`, `return_id`).
    pub fn field(self) -> &'static str {
        match self {
            Self::Order => "order_id",
            Self::Return => "return_id",
        }
    }

    /// "order", "return": for messages to people.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Return => "return",
        }
    }
}

/// An order or a return of a business: the chat of it is found with
/// `chats/new`. An order's chat and a return's chat are different chats,
/// even when the numbers are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChatContext {
    pub kind: ContextKind,
    pub id: i64,
}

impl fmt::Display for ChatContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.id)
    }
}

/// Where a message goes: a chat the event names, or the chat of an order
/// or return, found (once) with `chats/new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Chat(ChatId),
    Context(ChatContext),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Chat(chat) => write!(f, "chat {chat}"),
            Self::Context(ctx) => write!(f, "the chat of {ctx} (found with chats/new)"),
        }
    }
}

/// The conversation a delivery belongs to, within its business: messages
/// of one conversation go out one at a time, in the order their events
/// were accepted. It is the chat (`chat:5001`) once the chat is known, and
/// the order or return (`order:51234567`, `return:77`) until then; when
/// `chats/new` names the chat, the open deliveries of the order move to
/// the chat's conversation, keeping their order (ids ascend with
/// acceptance).
pub fn conversation_key(chat: Option<ChatId>, context: Option<ChatContext>) -> Option<String> {
    match (chat, context) {
        (Some(chat), _) => Some(format!("chat:{}", chat.0)),
        (None, Some(ctx)) => Some(format!("{}:{}", ctx.kind.noun(), ctx.id)),
        (None, None) => None,
    }
}

/// The Market methods chatbridge calls for a delivery. Each has its own
/// hourly quota and its own 420 pause; the 4-parallel cap counts them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MarketMethod {
    /// `POST /v2/businesses/{businessId}/chats/message`.
    #[serde(rename = "send")]
    SendMessage,
    /// `POST /v2/businesses/{businessId}/chats/new`: the chat of an order or return.
    #[serde(rename = "chats/new")]
    CreateChat,
}

impl MarketMethod {
    pub const ALL: [MarketMethod; 2] = [Self::SendMessage, Self::CreateChat];

    /// How it is stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendMessage => "send",
            Self::CreateChat => "chats/new",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// Why the Market paused a method of a business: the dispatcher does not
/// call it until the pause ends, and the store keeps the pause so that
/// every process, and a restarted one, knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// The Market answered 420 (rate limit).
    Market420,
    /// The Market's `X-RateLimit-Resource-Remaining` said 0.
    RemainingZero,
}

impl PauseReason {
    /// How it is stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Market420 => "market_420",
            Self::RemainingZero => "remaining_zero",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Market420, Self::RemainingZero]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Market420 => "the Market answered 420 (rate limit)",
            Self::RemainingZero => "the Market said X-RateLimit-Resource-Remaining: 0",
        }
    }
}

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

    /// States of a delivery still to be sent: it keeps the later ones of
    /// its conversation waiting.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Queued | Self::Sending | Self::Held)
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
