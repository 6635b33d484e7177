//! Payload extraction (json, key_value, csv, regex, plain) on arbitrary bytes,
//! with formats compiled once from the config's own serde representation.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tsgw_core::extract::{Extractor, PayloadFormat};
use tsgw_core::ChannelId;

const FORMATS: [&str; 6] = [
    r#"format = "json"
fields = { "/t" = "field1", "/a/b/0" = { target = "field2", scale = 0.1, offset = -40.0 }, "/s" = "status" }
time_pointer = "/ts""#,
    r#"format = "key_value"
fields = { t = "field1", h = "field2", loc = "latitude" }
time_key = "time""#,
    r#"format = "key_value"
fields = { t = "field1" }
pair_separator = ";"
kv_separator = ":""#,
    r#"format = "csv"
columns = { "0" = "field1", "1" = "field2", "3" = "elevation" }
time_column = 2"#,
    r#"format = "regex"
pattern = '^T=(?P<t>-?[0-9.]+) H=(?P<h>[0-9.]+)(?: at (?P<ts>\S+))?'
fields = { t = "field1", h = "field2" }
time_group = "ts""#,
    r#"format = "plain"
target = "field3""#,
];

fn extractors() -> &'static Vec<Extractor> {
    static EXTRACTORS: OnceLock<Vec<Extractor>> = OnceLock::new();
    EXTRACTORS.get_or_init(|| {
        let channel = ChannelId::new(1001).expect("valid channel");
        FORMATS
            .iter()
            .map(|text| {
                let format: PayloadFormat = toml::from_str(text).expect("bench format parses");
                Extractor::compile(&format, channel).expect("bench format compiles")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    for extractor in extractors() {
        let out = extractor.extract(data);
        for v in &out.values {
            if let tsgw_core::Value::Number(n) = v.value {
                assert!(n.is_finite(), "an extractor produced a non-finite number");
            }
        }
    }
});
