//! Planning block reads: which requests fetch a device's points in as few
//! round trips as the protocol allows.
//!
//! Points of the same table (holding, input, coil, discrete) are merged into one
//! request when they overlap, touch, or are separated by at most `max_gap` unused
//! addresses, as long as the request stays within the protocol limit (125
//! registers, 2000 coils/discrete inputs). A gap is read and thrown away, so a
//! device that answers "illegal data address" for unmapped registers needs
//! `max_gap = 0` (or a gap that avoids the hole).

use crate::config::{PointConfig, RegisterKind};

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
    /// Indexes into the device's points, in address order.
    pub points: Vec<usize>,
}

impl ReadBlock {
    fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// Plans the requests for `points`. Every point lands in exactly one block. Points
/// must have passed validation (they fit in the address space).
pub fn plan_reads(points: &[PointConfig], max_gap: u16) -> Vec<ReadBlock> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (points[i].kind, points[i].address, points[i].width()));

    let mut blocks: Vec<ReadBlock> = Vec::new();
    for i in order {
        let point = &points[i];
        let start = u32::from(point.address);
        let end = start + u32::from(point.width());
        let max = u32::from(point.kind.max_per_request());
        if let Some(block) = blocks.last_mut() {
            let reachable = start <= block.end() + u32::from(max_gap);
            let new_end = end.max(block.end());
            if block.kind == point.kind && reachable && new_end - u32::from(block.start) <= max {
                // Fits: new_end - start <= 2000, so the count fits in a u16.
                block.count = (new_end - u32::from(block.start)) as u16;
                block.points.push(i);
                continue;
            }
        }
        blocks.push(ReadBlock {
            kind: point.kind,
            start: point.address,
            count: point.width(),
            points: vec![i],
        });
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataType, WordOrder};
    use tsgw_core::Target;

    fn p(kind: RegisterKind, address: u16, data_type: DataType) -> PointConfig {
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

    fn spans(blocks: &[ReadBlock]) -> Vec<(RegisterKind, u16, u16)> {
        blocks.iter().map(|b| (b.kind, b.start, b.count)).collect()
    }

    use DataType::*;
    use RegisterKind::*;

    #[test]
    fn adjacent_points_merge_into_one_request() {
        let points = [
            p(Input, 0, F32),
            p(Input, 2, F32),
            p(Input, 4, U16),
            p(Input, 5, F64),
        ];
        let blocks = plan_reads(&points, 0);
        assert_eq!(spans(&blocks), vec![(Input, 0, 9)]);
        assert_eq!(blocks[0].points, vec![0, 1, 2, 3]);
    }

    #[test]
    fn gaps_are_bridged_up_to_max_gap_only() {
        // Energy meter layout: f32 at 0, 6, 12 (4-register holes between them).
        let points = [p(Input, 0, F32), p(Input, 6, F32), p(Input, 12, F32)];
        assert_eq!(
            spans(&plan_reads(&points, 3)),
            vec![(Input, 0, 2), (Input, 6, 2), (Input, 12, 2)]
        );
        assert_eq!(spans(&plan_reads(&points, 4)), vec![(Input, 0, 14)]);
    }

    #[test]
    fn tables_are_never_mixed_and_input_order_does_not_matter() {
        let points = [
            p(Holding, 1, U16),
            p(Coil, 0, Bool),
            p(Input, 0, U16),
            p(Holding, 0, U16),
            p(Discrete, 1, Bool),
            p(Coil, 1, Bool),
        ];
        let blocks = plan_reads(&points, 10);
        assert_eq!(
            spans(&blocks),
            vec![
                (Holding, 0, 2),
                (Input, 0, 1),
                (Coil, 0, 2),
                (Discrete, 1, 1)
            ]
        );
        assert_eq!(blocks[0].points, vec![3, 0]);
        assert_eq!(blocks[2].points, vec![1, 5]);
    }

    #[test]
    fn overlapping_points_share_registers() {
        // Two bits of one status register plus the register as a number.
        let mut a = p(Holding, 7, Bool);
        a.bit = Some(0);
        let mut b = p(Holding, 7, Bool);
        b.bit = Some(5);
        let points = [a, b, p(Holding, 7, U16), p(Holding, 6, U32)];
        let blocks = plan_reads(&points, 0);
        assert_eq!(spans(&blocks), vec![(Holding, 6, 2)]);
        assert_eq!(blocks[0].points.len(), 4);
    }

    #[test]
    fn requests_respect_the_protocol_limits() {
        let registers: Vec<_> = (0..130).map(|a| p(Holding, a, U16)).collect();
        assert_eq!(
            spans(&plan_reads(&registers, 0)),
            vec![(Holding, 0, 125), (Holding, 125, 5)]
        );
        // An f32 straddling the 125 boundary starts a new request rather than being split.
        let mut points: Vec<_> = (0..124).map(|a| p(Holding, a, U16)).collect();
        points.push(p(Holding, 124, F32));
        assert_eq!(
            spans(&plan_reads(&points, 0)),
            vec![(Holding, 0, 124), (Holding, 124, 2)]
        );
        let coils: Vec<_> = (0..2001).map(|a| p(Coil, a, Bool)).collect();
        assert_eq!(
            spans(&plan_reads(&coils, 0)),
            vec![(Coil, 0, 2000), (Coil, 2000, 1)]
        );
        // A huge gap setting never produces an oversized request.
        let far = [p(Input, 0, U16), p(Input, 200, U16)];
        assert_eq!(
            spans(&plan_reads(&far, u16::MAX)),
            vec![(Input, 0, 1), (Input, 200, 1)]
        );
    }

    #[test]
    fn the_top_of_the_address_space_is_handled() {
        let points = [p(Holding, 65532, F64), p(Holding, 65535, U16)];
        assert_eq!(spans(&plan_reads(&points, 0)), vec![(Holding, 65532, 4)]);
    }

    #[test]
    fn every_point_is_planned_exactly_once() {
        let points: Vec<_> = (0..300u16)
            .map(|i| {
                let kind = [Holding, Input, Coil, Discrete][usize::from(i % 4)];
                let ty = if kind.is_bit() {
                    Bool
                } else {
                    [U16, F32, F64][usize::from(i % 3)]
                };
                p(kind, (i * 37) % 1000, ty)
            })
            .collect();
        for gap in [0, 3, 50] {
            let blocks = plan_reads(&points, gap);
            let mut seen: Vec<usize> = blocks.iter().flat_map(|b| b.points.clone()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..points.len()).collect::<Vec<_>>());
            for b in &blocks {
                assert!(b.count <= b.kind.max_per_request());
                for &i in &b.points {
                    let pt = &points[i];
                    assert_eq!(pt.kind, b.kind);
                    assert!(pt.address >= b.start);
                    assert!(u32::from(pt.address) + u32::from(pt.width()) <= b.end());
                }
            }
        }
    }
}
