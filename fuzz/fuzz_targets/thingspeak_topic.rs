//! ThingSpeak topic parsing: any string a device or the broker hands us.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingspeak::Topic;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(topic) = Topic::parse(&text) {
        // Whatever parses must answer every question about itself without panicking.
        let _ = topic.channel();
        let _ = topic.is_publish();
        let _ = topic.has_key();
        let redacted = topic.redacted();
        assert!(redacted.len() <= text.len() + 64, "redaction grew the topic");
    }
});
