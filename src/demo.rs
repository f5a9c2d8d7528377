//! `--demo-data`: the seed's three sample events, the third (id 3) its 100-seat comedy show.

use chrono::{Duration, Utc};

use crate::domain::{Money, NewEvent};
use crate::stages::Stage;
use crate::store::StoreError;

/// Creates the demo events unless the database already has events.
pub async fn load(stage: &dyn Stage) -> Result<(), StoreError> {
    if !stage.events().await?.is_empty() {
        tracing::info!("--demo-data: the database already has events; leaving it as it is");
        return Ok(());
    }
    let soon = Utc::now() + Duration::days(30);
    // In this order: the seed's race script buys event 3, its load test the third in the list,
    // and both expect the 100-seat show.
    let events = [
        ("Summer Rock Festival", "Riverside Park", 50_000, 14_950),
        ("City Symphony: New Year Gala", "Concert Hall", 2_000, 8_900),
        ("Comedy Night", "The Laugh Factory", 100, 2_500),
    ];
    for (i, (name, venue, total, cents)) in events.into_iter().enumerate() {
        let new = NewEvent {
            name: name.into(),
            venue: venue.into(),
            date: soon + Duration::days(7 * i as i64),
            total_tickets: total,
            price: Money::from_cents(cents).expect("demo prices are valid"),
        };
        let event = stage.create_event(new).await?;
        tracing::info!(id = %event.id, name, total, "demo event created");
    }
    Ok(())
}
