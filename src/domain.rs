//! The domain's nouns: events, tickets, payments, and the value types that keep them valid.
//!
//! Everything here is parsed once at the edge ("parse, don't validate"): a [`NewEvent`] or a
//! [`UserId`] that exists is already known to be well formed.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Largest number of tickets one event may offer.
pub const MAX_TICKETS_PER_EVENT: u32 = 1_000_000;
/// Largest ticket price, in minor units (one million in major units).
pub const MAX_PRICE_CENTS: i64 = 100_000_000;
/// Longest event name, venue or user id, in characters.
pub const MAX_TEXT_CHARS: usize = 200;

/// An event's id: the row id SQLite gives it, as in the seed (`/api/v1/events/1`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct EventId(pub i64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A ticket's id. Event actors mint them from a seeded generator so a replayed run sees the
/// same ids, and so the same payment outcomes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct TicketId(pub Uuid);

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An order's id: one purchase of 1..=N tickets of one event, all or nothing.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How many tickets one order may hold.
pub const MAX_TICKETS_PER_ORDER: u32 = 100;

/// The prefix of every API v2 user's id. API v1's `userId` is a label the client declares; it
/// may not start with this prefix, so a v1 label can never name (or count as) a v2 user.
pub const V2_USER_PREFIX: &str = "v2:";

/// A buyer's id. The seed's clients send it as a string or a number; both are accepted and
/// kept as text (1..=200 characters, no control characters). API v2 users' ids are
/// `v2:<uuid>`; API v1 labels are anything else (see [`UserId::v1_label`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(DomainError::invalid("userId", "must not be empty"));
        }
        if trimmed.chars().count() > MAX_TEXT_CHARS {
            return Err(DomainError::invalid(
                "userId",
                "must be at most 200 characters",
            ));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(DomainError::invalid(
                "userId",
                "must not contain control characters",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// API v1's `userId`: a label the client declares, which may not take a v2 user's
    /// namespace (the `v2:` prefix, in any case).
    pub fn v1_label(raw: &str) -> Result<Self, DomainError> {
        let id = Self::parse(raw)?;
        let reserved =
            id.0.get(..V2_USER_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(V2_USER_PREFIX));
        if reserved {
            return Err(DomainError::invalid(
                "userId",
                "must not start with `v2:`, which is reserved for API v2 users",
            ));
        }
        Ok(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
            Float(f64),
        }
        let wrong =
            || serde::de::Error::custom("userId must be a string or a non-negative integer");
        let raw = match Raw::deserialize(d).map_err(|_| wrong())? {
            Raw::Text(s) => s,
            Raw::Number(n) => n.to_string(),
            // `5.0` is the integer 5, as JSON Schema counts it.
            Raw::Float(f) => match crate::api::integral(f) {
                Some(n) if n >= 0 => n.to_string(),
                _ => return Err(wrong()),
            },
        };
        // Only API v1 reads a user id from a body: it is a v1 label.
        UserId::v1_label(&raw).map_err(serde::de::Error::custom)
    }
}

/// Money in minor units (cents). Never a float in storage or arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

impl Money {
    /// An amount in cents: any non-negative value (an order's total may exceed one price's cap).
    pub fn from_cents(cents: i64) -> Result<Self, DomainError> {
        if cents < 0 {
            return Err(DomainError::invalid("amount", "must not be negative"));
        }
        Ok(Self(cents))
    }

    /// This amount times `n`, for an order of `n` tickets.
    pub fn times(self, n: u32) -> Self {
        Self(self.0.saturating_mul(i64::from(n)))
    }

    /// Parses the seed's `price`, a JSON number in major units with at most two decimals.
    pub fn from_major(value: f64) -> Result<Self, DomainError> {
        if !value.is_finite() || value < 0.0 {
            return Err(DomainError::invalid(
                "price",
                "must be a non-negative number",
            ));
        }
        let scaled = value * 100.0;
        let cents = scaled.round();
        if (scaled - cents).abs() > 1e-6 {
            return Err(DomainError::invalid(
                "price",
                "must have at most two decimal places",
            ));
        }
        if cents > MAX_PRICE_CENTS as f64 {
            return Err(DomainError::invalid(
                "price",
                "must be between 0 and 1000000.00",
            ));
        }
        Self::from_cents(cents as i64)
    }

    pub fn cents(self) -> i64 {
        self.0
    }

    /// The amount in major units, for display in JSON only.
    pub fn major(self) -> f64 {
        self.0 as f64 / 100.0
    }
}

/// A ticket's life: `pending` while its seat is held and payment runs, then `confirmed` or
/// `cancelled` (with a [`CancelReason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TicketStatus {
    Pending,
    Confirmed,
    Cancelled,
}

impl TicketStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "confirmed" => Some(Self::Confirmed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// Orders move through the same states as their tickets.
pub type OrderStatus = TicketStatus;

/// Why a ticket ended `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    PaymentDeclined,
    HoldExpired,
    /// The server stopped while the purchase ran and recovery found no successful charge.
    Interrupted,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PaymentDeclined => "payment_declined",
            Self::HoldExpired => "hold_expired",
            Self::Interrupted => "interrupted",
        }
    }
}

/// A payment's life, as stored: `pending` until the gateway answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentStatus {
    Pending,
    Completed,
    Failed,
    Refunded,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
        }
    }
}

/// An event as stored and as served by API v1 (camelCase, like the seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: EventId,
    pub name: String,
    pub venue: String,
    #[schema(format = DateTime)]
    pub date: String,
    pub total_tickets: u32,
    pub available_tickets: u32,
    /// Price in major units, for the seed's clients. `price_cents` is the exact value.
    pub price: f64,
    pub price_cents: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// A ticket as stored and as served by API v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    pub id: TicketId,
    pub event_id: EventId,
    pub user_id: String,
    #[schema(format = DateTime)]
    pub purchase_date: String,
    pub price: f64,
    pub price_cents: i64,
    pub status: TicketStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
}

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub id: OrderId,
    pub event_id: EventId,
    pub user_id: String,
    pub quantity: u32,
    pub amount_cents: i64,
    pub status: OrderStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    pub tickets: Vec<TicketId>,
    pub created_at: String,
    pub updated_at: String,
}

/// A validated request to create an event.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub name: String,
    pub venue: String,
    pub date: DateTime<Utc>,
    pub total_tickets: u32,
    pub price: Money,
}

impl NewEvent {
    pub fn parse(
        name: &str,
        venue: &str,
        date: &str,
        total_tickets: i64,
        price: Money,
    ) -> Result<Self, DomainError> {
        let name = parse_text("name", name)?;
        let venue = parse_text("venue", venue)?;
        let date = DateTime::parse_from_rfc3339(date.trim())
            .map_err(|_| {
                DomainError::invalid(
                    "date",
                    "must be an RFC 3339 date-time such as 2026-12-31T20:00:00Z",
                )
            })?
            .with_timezone(&Utc);
        if !(1..=i64::from(MAX_TICKETS_PER_EVENT)).contains(&total_tickets) {
            return Err(DomainError::invalid(
                "totalTickets",
                "must be an integer between 1 and 1000000",
            ));
        }
        Ok(Self {
            name,
            venue,
            date,
            total_tickets: total_tickets as u32,
            price,
        })
    }
}

fn parse_text(field: &'static str, raw: &str) -> Result<String, DomainError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if trimmed.chars().count() > MAX_TEXT_CHARS {
        return Err(DomainError::invalid(
            field,
            "must be at most 200 characters",
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Parses an order's ticket count: 1..=`MAX_TICKETS_PER_ORDER`.
pub fn parse_quantity(raw: i64) -> Result<u32, DomainError> {
    if (1..=i64::from(MAX_TICKETS_PER_ORDER)).contains(&raw) {
        Ok(raw as u32)
    } else {
        Err(DomainError::invalid(
            "quantity",
            "must be an integer between 1 and 100",
        ))
    }
}

/// A field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct DomainError {
    pub field: &'static str,
    pub reason: &'static str,
}

impl DomainError {
    pub fn invalid(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }
}

/// Timestamps are stored and served as RFC 3339 in UTC with millisecond precision.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_in_major_units_become_exact_cents() {
        assert_eq!(Money::from_major(49.99).unwrap().cents(), 4999);
        assert_eq!(Money::from_major(0.1).unwrap().cents(), 10);
        assert!(Money::from_major(1.005).is_err());
        assert!(Money::from_major(-1.0).is_err());
        assert!(Money::from_major(2e6).is_err());
    }

    #[test]
    fn user_ids_accept_strings_and_numbers_but_not_blanks() {
        let from_number: UserId = serde_json::from_str("42").unwrap();
        assert_eq!(from_number.as_str(), "42");
        let from_text: UserId = serde_json::from_str("\"alice\"").unwrap();
        assert_eq!(from_text.as_str(), "alice");
        assert!(serde_json::from_str::<UserId>("\"  \"").is_err());
        assert!(serde_json::from_str::<UserId>("-3").is_err());
        assert!(serde_json::from_str::<UserId>("true").is_err());
    }

    #[test]
    fn a_v1_label_cannot_take_the_v2_namespace() {
        for taken in ["v2:0b7c", "V2:0b7c", "  v2:x"] {
            assert!(UserId::v1_label(taken).is_err(), "{taken}");
            assert!(serde_json::from_str::<UserId>(&format!("\"{taken}\"")).is_err());
        }
        assert!(UserId::v1_label("v2").is_ok());
        assert!(UserId::v1_label("alice:v2:").is_ok());
        assert!(
            UserId::parse("v2:0b7c").is_ok(),
            "stored v2 ids still parse"
        );
    }

    #[test]
    fn a_new_event_needs_a_real_date_and_a_sane_size() {
        let price = Money::from_cents(100).unwrap();
        assert!(NewEvent::parse("Show", "Hall", "2026-12-31T20:00:00Z", 100, price).is_ok());
        assert!(NewEvent::parse("Show", "Hall", "next friday", 100, price).is_err());
        assert!(NewEvent::parse("Show", "Hall", "2026-12-31T20:00:00Z", 0, price).is_err());
        assert!(NewEvent::parse(" ", "Hall", "2026-12-31T20:00:00Z", 1, price).is_err());
    }
}
