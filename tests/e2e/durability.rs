//! Nothing flushed to the queue is lost: not to SIGKILL, not to an upstream outage.

use std::time::Duration;

use crate::common::*;

/// 24 distinct (channel, field) slots, so merging cannot hide a lost reading.
fn slots() -> Vec<(u64, u8)> {
    CHANNELS
        .iter()
        .flat_map(|&ch| (1..=8).map(move |f| (ch, f)))
        .collect()
}

async fn publish_slots(dev: &Device, round: u32) {
    for (ch, f) in slots() {
        publish(
            dev,
            &format!("channels/{ch}/publish/fields/field{f}"),
            format!("{round}{ch}{f}"),
        )
        .await;
    }
}

fn all_slots_delivered(got: &Delivered, round: u32) -> bool {
    slots().iter().all(|(ch, f)| {
        got.get(&(*ch, format!("field{f}")))
            .is_some_and(|v| v.contains(&format!("{round}{ch}{f}")))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_flushed_before_sigkill_arrive_after_restart() {
    let emulator = emulator(Duration::from_secs(1)).await;
    // Upstream refuses everything while the readings come in, so they can only be in the queue.
    emulator.refuse_connections_for(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));

    let gateway = Gateway::start(&config);
    let dev = device(gateway.mqtt, "killed-under").await;
    publish_slots(&dev, 1).await;
    // Wait until the gateway has them all, then past one flush interval (200 ms).
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.metric("tsgw_queue_readings").await < 24.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readings not queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    gateway.kill();
    assert!(
        entries(&emulator, 1001).is_empty(),
        "nothing could have been delivered yet"
    );

    emulator.clear_faults();
    let gateway = Gateway::start(&config);
    wait_for_delivery(&emulator, "every slot of round 1", |got| {
        all_slots_delivered(got, 1)
    })
    .await;
    assert_eq!(emulator.counters().dropped_rate_limit, 0);
    drop(gateway);
}

/// Round `r` writes the 8 fields of its own channel: a later round cannot
/// supersede an earlier one's values by merging (last value per field wins).
async fn publish_round(dev: &Device, round: usize) {
    publish_channel(dev, CHANNELS[round - 1], &round.to_string()).await;
}

fn round_delivered(got: &Delivered, round: usize) -> bool {
    channel_delivered(got, CHANNELS[round - 1], &round.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_delivering_loses_nothing_flushed() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    for round in 1..=3 {
        let gateway = Gateway::start(&config);
        let dev = device(gateway.mqtt, "mid-stream").await;
        publish_round(&dev, round).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while gateway
            .metric(r#"tsgw_readings_total{device="drop_in",result="accepted",source="mqtt"}"#)
            .await
            < 8.0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readings not taken in"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Past a flush (200 ms), then kill: the first update of a restarted
        // gateway waits one interval (1 s), so this kills before or while it goes out.
        tokio::time::sleep(Duration::from_millis(300 + 300 * round as u64)).await;
        gateway.kill();
    }
    let gateway = Gateway::start(&config);
    for round in 1..=3 {
        wait_for_delivery(&emulator, &format!("every field of round {round}"), |got| {
            round_delivered(got, round)
        })
        .await;
    }
    assert_eq!(emulator.counters().dropped_rate_limit, 0);
    drop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_of_an_outage_is_delivered_after_it() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let gateway = Gateway::start(&config);
    let dev = device(gateway.mqtt, "outage").await;

    emulator.refuse_connections_for(Duration::from_secs(4));
    emulator.drop_all_connections();
    publish_slots(&dev, 7).await;
    wait_for_delivery(&emulator, "the backlog", |got| all_slots_delivered(got, 7)).await;
    assert!(
        emulator.counters().refusals > 0,
        "the outage did not happen"
    );
    assert_eq!(emulator.counters().dropped_rate_limit, 0);
    assert_eq!(gateway.metric("tsgw_queue_readings").await, 0.0);
}
