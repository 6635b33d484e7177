//! Turning a number into the registers of a point, for writes: the inverse of
//! [`crate::decode`], with the same types, word orders and scale/offset.
//!
//! Nothing is rounded or clamped silently: a value that the type cannot hold
//! exactly (a fraction for an integer type after scaling, a number out of the
//! type's range) is an error naming why.

use crate::config::{DataType, WordOrder};

/// Why a value cannot be written as a point's registers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{value} is not a finite number")]
    NotFinite { value: f64 },
    #[error("{value} becomes {raw} after scale and offset, which is not a whole number for a {data_type:?} register")]
    NotWhole {
        value: f64,
        raw: f64,
        data_type: DataType,
    },
    #[error("{value} becomes {raw} after scale and offset, outside the range of {data_type:?}")]
    OutOfRange {
        value: f64,
        raw: f64,
        data_type: DataType,
    },
    #[error("type bool is written to a coil, not to registers")]
    Bool,
}

/// The registers (in wire order) that hold `value` for a point of
/// `data_type`/`order` read as `raw * scale + offset`.
pub fn encode_value(
    value: f64,
    data_type: DataType,
    order: WordOrder,
    scale: f64,
    offset: f64,
) -> Result<Vec<u16>, EncodeError> {
    if !value.is_finite() {
        return Err(EncodeError::NotFinite { value });
    }
    let raw = (value - offset) / scale;
    if !raw.is_finite() {
        return Err(EncodeError::NotFinite { value: raw });
    }
    let whole = || {
        let rounded = raw.round();
        // Scaling by a decimal fraction (0.1) leaves binary noise: 21.5 / 0.1
        // is 214.99999999999997. Anything further from a whole number is a
        // value the register cannot hold.
        if (raw - rounded).abs() <= 1e-9 * rounded.abs().max(1.0) {
            Ok(rounded)
        } else {
            Err(EncodeError::NotWhole {
                value,
                raw,
                data_type,
            })
        }
    };
    let range = |min: f64, max: f64| -> Result<f64, EncodeError> {
        let r = whole()?;
        if r < min || r > max {
            Err(EncodeError::OutOfRange {
                value,
                raw,
                data_type,
            })
        } else {
            Ok(r)
        }
    };
    let be: Vec<u8> = match data_type {
        DataType::Bool => return Err(EncodeError::Bool),
        DataType::U16 => (range(0.0, f64::from(u16::MAX))? as u16)
            .to_be_bytes()
            .to_vec(),
        DataType::I16 => (range(f64::from(i16::MIN), f64::from(i16::MAX))? as i16)
            .to_be_bytes()
            .to_vec(),
        DataType::U32 => (range(0.0, f64::from(u32::MAX))? as u32)
            .to_be_bytes()
            .to_vec(),
        DataType::I32 => (range(f64::from(i32::MIN), f64::from(i32::MAX))? as i32)
            .to_be_bytes()
            .to_vec(),
        // Past 2^53 an f64 is no longer exact: refuse rather than write a neighbour.
        DataType::U64 => (range(0.0, 9_007_199_254_740_992.0)? as u64)
            .to_be_bytes()
            .to_vec(),
        DataType::I64 => (range(-9_007_199_254_740_992.0, 9_007_199_254_740_992.0)? as i64)
            .to_be_bytes()
            .to_vec(),
        DataType::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(EncodeError::OutOfRange {
                    value,
                    raw,
                    data_type,
                });
            }
            (raw as f32).to_be_bytes().to_vec()
        }
        DataType::F64 => raw.to_be_bytes().to_vec(),
    };
    Ok(to_wire(&be, order))
}

/// Lays out big-endian bytes as registers in `order` (see [`WordOrder`]).
fn to_wire(be: &[u8], order: WordOrder) -> Vec<u16> {
    let mut words: Vec<u16> = be
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        .collect();
    if matches!(order, WordOrder::CDAB | WordOrder::DCBA) {
        words.reverse();
    }
    if matches!(order, WordOrder::BADC | WordOrder::DCBA) {
        for w in &mut words {
            *w = w.swap_bytes();
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode_registers;

    const ORDERS: [WordOrder; 4] = [
        WordOrder::ABCD,
        WordOrder::CDAB,
        WordOrder::BADC,
        WordOrder::DCBA,
    ];

    #[test]
    fn every_type_and_order_decodes_back_to_the_value() {
        let cases: [(DataType, f64); 8] = [
            (DataType::U16, 65535.0),
            (DataType::I16, -200.0),
            (DataType::U32, 4_294_967_294.0),
            (DataType::I32, -2.0),
            (DataType::F32, f64::from(123.456f32)),
            (DataType::U64, 9_007_199_254_740_992.0),
            (DataType::I64, -1234567890123.0),
            (DataType::F64, -0.000123),
        ];
        for (t, v) in cases {
            for order in ORDERS {
                let words = encode_value(v, t, order, 1.0, 0.0).unwrap();
                assert_eq!(words.len(), usize::from(t.width()), "{t:?}");
                assert_eq!(
                    decode_registers(&words, t, order, None),
                    Some(v),
                    "{t:?} {order:?}"
                );
            }
        }
        // Known bytes: 123.456f32 = 0x42F6E979 with swapped words.
        assert_eq!(
            encode_value(
                f64::from(123.456f32),
                DataType::F32,
                WordOrder::CDAB,
                1.0,
                0.0
            )
            .unwrap(),
            [0xE979, 0x42F6]
        );
    }

    #[test]
    fn scale_and_offset_are_inverted_and_nothing_is_rounded_silently() {
        // A setpoint of 21.5 °C in tenths: 215.
        assert_eq!(
            encode_value(21.5, DataType::I16, WordOrder::ABCD, 0.1, 0.0).unwrap(),
            [215]
        );
        assert_eq!(
            encode_value(25.0, DataType::U16, WordOrder::ABCD, 1.0, 5.0).unwrap(),
            [20]
        );
        assert!(matches!(
            encode_value(21.55, DataType::I16, WordOrder::ABCD, 0.1, 0.0),
            Err(EncodeError::NotWhole { .. })
        ));
        assert!(matches!(
            encode_value(70000.0, DataType::U16, WordOrder::ABCD, 1.0, 0.0),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode_value(-1.0, DataType::U32, WordOrder::ABCD, 1.0, 0.0),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode_value(f64::NAN, DataType::F32, WordOrder::ABCD, 1.0, 0.0),
            Err(EncodeError::NotFinite { .. })
        ));
        assert_eq!(
            encode_value(1.0, DataType::Bool, WordOrder::ABCD, 1.0, 0.0),
            Err(EncodeError::Bool)
        );
    }
}
