//! ThingSpeak channel-feed payloads (`field1=..&status=..`) and single-field values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingspeak::{parse_field_value, ChannelUpdate, Field};

fuzz_target!(|data: &[u8]| {
    if let Ok(update) = ChannelUpdate::parse(data) {
        // A parsed update must encode, and the encoding must parse back to the
        // same values (created_at is sent at seconds resolution by design, and
        // escaping may push the encoding past the 3000-byte message limit).
        let encoded = update.encode();
        if encoded.len() <= 3000 {
            let again = ChannelUpdate::parse(encoded.as_bytes())
                .expect("an encoded update parses");
            assert_eq!(again.values, update.values, "encode/parse round trip changed the values");
        }
        let _ = update.validate();
    }
    for n in 1..=8 {
        let field = Field::new(n).expect("1..=8 are fields");
        let _ = parse_field_value(field, data);
    }
});
