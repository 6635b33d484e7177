//! Turning the registers or bits of a read block into a point's number.
//!
//! Pure functions, so every type and word order is unit-tested against known
//! byte patterns. 64-bit integers become `f64` (exact up to 2^53), because readings
//! are numbers for ThingSpeak.

use crate::config::{DataType, PointConfig, WordOrder};

/// What one read request returned.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockData {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// Why a point got no value from an otherwise successful read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("the response holds {got} items, the point needs items {from}..{to}")]
    Short { got: usize, from: usize, to: usize },
    #[error("the response carries bits where registers were expected (or the other way round)")]
    WrongTable,
    #[error("the value decodes to {0}, which is not a finite number")]
    NotFinite(f64),
}

/// Decodes `point` from `data`, which starts at address `block_start`, and applies
/// scale and offset.
pub fn decode_point(
    point: &PointConfig,
    block_start: u16,
    data: &BlockData,
) -> Result<f64, DecodeError> {
    let from = usize::from(point.address.saturating_sub(block_start));
    let to = from + usize::from(point.width());
    let raw = match data {
        BlockData::Bits(bits) => {
            if !point.kind.is_bit() {
                return Err(DecodeError::WrongTable);
            }
            let bit = bits.get(from).ok_or(DecodeError::Short {
                got: bits.len(),
                from,
                to,
            })?;
            f64::from(u8::from(*bit))
        }
        BlockData::Registers(words) => {
            if point.kind.is_bit() {
                return Err(DecodeError::WrongTable);
            }
            let slice = words.get(from..to).ok_or(DecodeError::Short {
                got: words.len(),
                from,
                to,
            })?;
            decode_registers(slice, point.data_type, point.order, point.bit).ok_or(
                DecodeError::Short {
                    got: words.len(),
                    from,
                    to,
                },
            )?
        }
    };
    let value = raw * point.scale + point.offset;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(DecodeError::NotFinite(value))
    }
}

/// Decodes the registers of one value (exactly `data_type.width()` of them, in wire
/// order). `None` if the slice has the wrong length. A bool needs `bit`.
pub fn decode_registers(
    words: &[u16],
    data_type: DataType,
    order: WordOrder,
    bit: Option<u8>,
) -> Option<f64> {
    if words.len() != usize::from(data_type.width()) {
        return None;
    }
    let mut bytes = [0u8; 8];
    let n = words.len() * 2;
    // Bring the registers into big-endian word and byte order: most significant byte first.
    for (i, word) in words.iter().enumerate() {
        let word = if order.bytes_swapped() {
            word.swap_bytes()
        } else {
            *word
        };
        let slot = if order.low_word_first() {
            words.len() - 1 - i
        } else {
            i
        };
        let [hi, lo] = word.to_be_bytes();
        bytes[slot * 2] = hi;
        bytes[slot * 2 + 1] = lo;
    }
    let be = &bytes[..n];
    let value = match data_type {
        DataType::Bool => {
            let word = u16::from_be_bytes([be[0], be[1]]);
            let bit = bit?;
            f64::from((word.checked_shr(u32::from(bit))? & 1) as u8)
        }
        DataType::U16 => f64::from(u16::from_be_bytes([be[0], be[1]])),
        DataType::I16 => f64::from(i16::from_be_bytes([be[0], be[1]])),
        DataType::U32 => f64::from(u32::from_be_bytes(be.try_into().ok()?)),
        DataType::I32 => f64::from(i32::from_be_bytes(be.try_into().ok()?)),
        DataType::F32 => f64::from(f32::from_be_bytes(be.try_into().ok()?)),
        DataType::U64 => u64::from_be_bytes(be.try_into().ok()?) as f64,
        DataType::I64 => i64::from_be_bytes(be.try_into().ok()?) as f64,
        DataType::F64 => f64::from_be_bytes(be.try_into().ok()?),
    };
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegisterKind;
    use tsgw_core::Target;

    fn regs(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    /// Lays the big-endian bytes of a value out on the wire in `order` (the inverse of
    /// the decoder, written independently: by byte positions).
    fn wire(be: &[u8], order: WordOrder) -> Vec<u16> {
        let words: Vec<[u8; 2]> = be.chunks(2).map(|c| [c[0], c[1]]).collect();
        let mut words = match order {
            WordOrder::ABCD | WordOrder::BADC => words,
            WordOrder::CDAB | WordOrder::DCBA => words.into_iter().rev().collect(),
        };
        if matches!(order, WordOrder::BADC | WordOrder::DCBA) {
            for w in &mut words {
                w.swap(0, 1);
            }
        }
        words.iter().map(|w| u16::from_be_bytes(*w)).collect()
    }

    const ORDERS: [WordOrder; 4] = [
        WordOrder::ABCD,
        WordOrder::CDAB,
        WordOrder::BADC,
        WordOrder::DCBA,
    ];

    #[test]
    fn f32_in_every_word_order_from_known_bytes() {
        // 123.456f32 = 0x42F6E979: A=42 B=F6 C=E9 D=79
        let expected = f64::from(123.456f32);
        let cases = [
            (WordOrder::ABCD, [0x42F6, 0xE979]),
            (WordOrder::CDAB, [0xE979, 0x42F6]),
            (WordOrder::BADC, [0xF642, 0x79E9]),
            (WordOrder::DCBA, [0x79E9, 0xF642]),
        ];
        for (order, words) in cases {
            assert_eq!(
                decode_registers(&words, DataType::F32, order, None),
                Some(expected),
                "{order:?}"
            );
        }
    }

    #[test]
    fn u32_and_i32_in_every_word_order() {
        let cases = [
            (WordOrder::ABCD, [0x1234, 0x5678]),
            (WordOrder::CDAB, [0x5678, 0x1234]),
            (WordOrder::BADC, [0x3412, 0x7856]),
            (WordOrder::DCBA, [0x7856, 0x3412]),
        ];
        for (order, words) in cases {
            assert_eq!(
                decode_registers(&words, DataType::U32, order, None),
                Some(f64::from(0x1234_5678u32)),
                "{order:?}"
            );
        }
        // -2 = FF FF FF FE
        assert_eq!(
            decode_registers(&[0xFFFE, 0xFFFF], DataType::I32, WordOrder::CDAB, None),
            Some(-2.0)
        );
        assert_eq!(
            decode_registers(&[0xFFFF, 0xFFFE], DataType::U32, WordOrder::ABCD, None),
            Some(4_294_967_294.0)
        );
    }

    #[test]
    fn sixteen_bit_types_see_only_the_byte_order() {
        assert_eq!(
            decode_registers(&[0xFF38], DataType::I16, WordOrder::ABCD, None),
            Some(-200.0)
        );
        assert_eq!(
            decode_registers(&[0xFF38], DataType::U16, WordOrder::CDAB, None),
            Some(65336.0)
        );
        assert_eq!(
            decode_registers(&[0x38FF], DataType::I16, WordOrder::BADC, None),
            Some(-200.0)
        );
        assert_eq!(
            decode_registers(&[0x38FF], DataType::I16, WordOrder::DCBA, None),
            Some(-200.0)
        );
    }

    #[test]
    fn sixty_four_bit_types_generalise_the_orders() {
        // 0x0102030405060708 in each order, by explicit wire pattern.
        let cases = [
            (WordOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
            (WordOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
            (WordOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
            (WordOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, words) in cases {
            assert_eq!(
                decode_registers(&words, DataType::U64, order, None),
                Some(0x0102_0304_0506_0708u64 as f64),
                "{order:?}"
            );
        }
        for order in ORDERS {
            let words = wire(&(-5i64).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&words, DataType::I64, order, None),
                Some(-5.0)
            );
            let words = wire(&(-1234.5678f64).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&words, DataType::F64, order, None),
                Some(-1234.5678)
            );
            let words = wire(&(-7i32).to_be_bytes(), order);
            assert_eq!(
                decode_registers(&words, DataType::I32, order, None),
                Some(-7.0)
            );
        }
    }

    #[test]
    fn bool_from_a_register_bit() {
        assert_eq!(
            decode_registers(&[0b1000], DataType::Bool, WordOrder::ABCD, Some(3)),
            Some(1.0)
        );
        assert_eq!(
            decode_registers(&[0b1000], DataType::Bool, WordOrder::ABCD, Some(2)),
            Some(0.0)
        );
        assert_eq!(
            decode_registers(&[0x8000], DataType::Bool, WordOrder::ABCD, Some(15)),
            Some(1.0)
        );
        // Swapped bytes: bit 15 of the value sits in the low byte on the wire.
        assert_eq!(
            decode_registers(&[0x0080], DataType::Bool, WordOrder::BADC, Some(15)),
            Some(1.0)
        );
        assert_eq!(
            decode_registers(&[1], DataType::Bool, WordOrder::ABCD, None),
            None
        );
    }

    #[test]
    fn wrong_length_is_refused() {
        assert_eq!(
            decode_registers(&[1], DataType::F32, WordOrder::ABCD, None),
            None
        );
        assert_eq!(
            decode_registers(&regs(&[0; 6]), DataType::F64, WordOrder::ABCD, None),
            None
        );
    }

    fn point(kind: RegisterKind, address: u16, data_type: DataType) -> PointConfig {
        PointConfig {
            name: None,
            kind,
            address,
            data_type,
            order: WordOrder::ABCD,
            bit: None,
            scale: 1.0,
            offset: 0.0,
            target: Target::Status,
            channel: None,
        }
    }

    #[test]
    fn points_are_found_at_their_offset_in_the_block_and_scaled() {
        let data = BlockData::Registers(vec![0, 0, 0xFF38, 0x42F6, 0xE979]);
        let mut p = point(RegisterKind::Holding, 12, DataType::I16);
        p.scale = 0.1;
        p.offset = 20.0;
        let v = decode_point(&p, 10, &data).unwrap();
        assert!((v - 0.0).abs() < 1e-9, "{v}"); // -200 * 0.1 + 20
        let p = point(RegisterKind::Holding, 13, DataType::F32);
        assert_eq!(decode_point(&p, 10, &data), Ok(f64::from(123.456f32)));
        let p = point(RegisterKind::Holding, 14, DataType::F32);
        assert!(matches!(
            decode_point(&p, 10, &data),
            Err(DecodeError::Short { got: 5, .. })
        ));
    }

    #[test]
    fn coils_and_discrete_inputs() {
        let data = BlockData::Bits(vec![false, true, false]);
        let p = point(RegisterKind::Coil, 101, DataType::Bool);
        assert_eq!(decode_point(&p, 100, &data), Ok(1.0));
        let p = point(RegisterKind::Discrete, 102, DataType::Bool);
        assert_eq!(decode_point(&p, 100, &data), Ok(0.0));
        let p = point(RegisterKind::Coil, 103, DataType::Bool);
        assert!(decode_point(&p, 100, &data).is_err());
        let p = point(RegisterKind::Input, 100, DataType::U16);
        assert_eq!(decode_point(&p, 100, &data), Err(DecodeError::WrongTable));
    }

    #[test]
    fn nan_and_infinity_are_refused() {
        let nan = BlockData::Registers(vec![0x7FC0, 0x0000]);
        let p = point(RegisterKind::Input, 0, DataType::F32);
        assert!(matches!(
            decode_point(&p, 0, &nan),
            Err(DecodeError::NotFinite(_))
        ));
        let inf = BlockData::Registers(vec![0x7F80, 0x0000]);
        assert!(matches!(
            decode_point(&p, 0, &inf),
            Err(DecodeError::NotFinite(v)) if v == f64::INFINITY
        ));
    }
}
