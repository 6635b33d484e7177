//! Modbus register decoding: any register words, every type, order and bit.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tsgw_modbus::config::PointConfig;
use tsgw_modbus::decode::{decode_point, decode_registers, BlockData};

const TYPES: [&str; 9] = ["bool", "u16", "i16", "u32", "i32", "f32", "u64", "i64", "f64"];
const ORDERS: [&str; 4] = ["ABCD", "CDAB", "BADC", "DCBA"];
const KINDS: [&str; 4] = ["holding", "input", "coil", "discrete"];

/// Every combination of kind, type and order, parsed once through the config's own serde.
fn points() -> &'static Vec<PointConfig> {
    static POINTS: OnceLock<Vec<PointConfig>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let mut out = Vec::new();
        for kind in KINDS {
            for ty in TYPES {
                for order in ORDERS {
                    let text = format!(
                        "kind = \"{kind}\"\naddress = 3\ntype = \"{ty}\"\norder = \"{order}\"\n\
                         scale = 0.5\noffset = -1.0\ntarget = \"field1\"\n"
                    );
                    if let Ok(p) = toml::from_str::<PointConfig>(&text) {
                        out.push(p);
                    }
                }
            }
        }
        assert!(!out.is_empty(), "no point config parsed: the template is stale");
        out
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let points = points();
    let point = &points[usize::from(data[0]) % points.len()];
    let block_start = u16::from(data[1] % 8);
    let words: Vec<u16> = data[3..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    let bits: Vec<bool> = data[3..].iter().map(|b| b & 1 == 1).collect();
    if let Ok(v) = decode_point(point, block_start, &BlockData::Registers(words.clone())) {
        assert!(v.is_finite());
    }
    if let Ok(v) = decode_point(point, block_start, &BlockData::Bits(bits)) {
        assert!(v.is_finite());
    }
    let bit = (data[2] < 32).then_some(data[2]);
    let _ = decode_registers(&words, point.data_type, point.order, bit);
});
