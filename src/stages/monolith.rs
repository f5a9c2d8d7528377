//! Stage `monolith`: the seed's step 1, racy on purpose.
//!
//! Read availability, create a pending ticket, wait for the slow payment, confirm, then write
//! back `available = value_read - 1`. Each step is its own autocommit statement; nothing locks
//! the event and no transaction spans the whole. Concurrent buyers all read the same
//! `available`, all pass the check, all get confirmed (oversell) and all write back the same
//! value (lost update). That is the lesson this stage exists to teach; do not fix it here.

use async_trait::async_trait;
use uuid::Uuid;

use super::{PurchaseError, Stage, StageParts};
use crate::config::StageKind;
use chrono::Utc;

use crate::domain::{
    timestamp, CancelReason, Event, EventId, NewEvent, OrderId, Ticket, TicketId, UserId,
};
use crate::payments::ChargeOutcome;
use crate::store::{Catalog, NewOrder, Records, StoreError};

pub struct Monolith {
    parts: StageParts,
}

impl Monolith {
    pub fn new(parts: StageParts) -> Self {
        Self { parts }
    }
}

#[async_trait]
impl Stage for Monolith {
    fn kind(&self) -> StageKind {
        StageKind::Monolith
    }

    fn records(&self) -> &dyn Records {
        &self.parts.store
    }

    async fn create_event(&self, new: NewEvent) -> Result<Event, StoreError> {
        self.parts.store.create_event(&new).await
    }

    #[tracing::instrument(skip(self), fields(stage = "monolith"))]
    async fn purchase(&self, event: EventId, user: UserId) -> Result<Ticket, PurchaseError> {
        if self.parts.settings.purchase_transaction {
            // its own task: a client hanging up must not cut a transaction short
            let parts = self.parts.clone();
            return tokio::spawn(
                async move { purchase_in_one_transaction(&parts, event, user).await },
            )
            .await
            .map_err(|e| StoreError::Unavailable(format!("the purchase task failed: {e}")))?;
        }
        let store = &self.parts.store;
        // 1. check availability (the race starts here)
        let (available, price) = store
            .read_availability(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        if available <= 0 {
            return Err(PurchaseError::SoldOut);
        }
        // 2. create a pending ticket (an order of one, with its payment)
        let order = OrderId(Uuid::new_v4());
        let pending = NewOrder {
            order,
            tickets: vec![TicketId(Uuid::new_v4())],
            event,
            user: user.as_str().to_owned(),
            unit_price: price,
            idempotency: None,
            created_at: timestamp(Utc::now()),
        };
        store.insert_pending_order(&pending).await?;
        // 3. the slow payment, while other buyers read the same `available`
        let _in_flight = self.parts.payments.track();
        match self
            .parts
            .payments
            .charge(&pending.payment_key(), price)
            .await?
        {
            ChargeOutcome::Approved { .. } => {
                // 4. confirm, then write back what was read minus one (the lost update)
                store.confirm_order(order).await?;
                store.write_available(event, available - 1).await?;
                store
                    .first_ticket(order)
                    .await?
                    .ok_or_else(|| StoreError::Conflict("confirmed ticket vanished".into()).into())
            }
            ChargeOutcome::Declined => {
                store
                    .cancel_order(order, CancelReason::PaymentDeclined)
                    .await?;
                Err(PurchaseError::PaymentDeclined)
            }
        }
    }
}

/// `--purchase-transaction`: the same steps inside one `BEGIN IMMEDIATE` … `COMMIT`, held
/// across the payment. No race is left (the check and the write-back are one transaction, and
/// the write-back decrements what is stored), but on SQLite every other purchase waits for the
/// file's write lock until the payment is over, or gives up after `--sqlite-busy-timeout` with
/// `database is locked`.
async fn purchase_in_one_transaction(
    parts: &StageParts,
    event: EventId,
    user: UserId,
) -> Result<Ticket, PurchaseError> {
    let mut tx = parts.store.begin_write().await?;
    let outcome = async {
        let (available, price) = tx
            .read_availability(event)
            .await?
            .ok_or(PurchaseError::UnknownEvent)?;
        if available <= 0 {
            return Err(PurchaseError::SoldOut);
        }
        let order = OrderId(Uuid::new_v4());
        let pending = NewOrder {
            order,
            tickets: vec![TicketId(Uuid::new_v4())],
            event,
            user: user.as_str().to_owned(),
            unit_price: price,
            idempotency: None,
            created_at: timestamp(Utc::now()),
        };
        tx.insert_pending_order(&pending).await?;
        match parts.payments.charge(&pending.payment_key(), price).await? {
            ChargeOutcome::Approved { .. } => {
                tx.confirm_and_take_seat(order, event).await?;
                tx.first_ticket(order)
                    .await?
                    .ok_or_else(|| StoreError::Conflict("confirmed ticket vanished".into()).into())
            }
            ChargeOutcome::Declined => {
                tx.cancel_order(order, CancelReason::PaymentDeclined)
                    .await?;
                Err(PurchaseError::PaymentDeclined)
            }
        }
    }
    .await;
    match outcome {
        Ok(ticket) => {
            tx.commit().await?;
            Ok(ticket)
        }
        Err(PurchaseError::PaymentDeclined) => {
            tx.commit().await?;
            Err(PurchaseError::PaymentDeclined)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}
