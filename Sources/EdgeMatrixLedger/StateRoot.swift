import EdgeMatrixCore

/// The state root: a Merkle root (Core's `MerkleTree`) over one leaf per piece of state, in a canonical order —
/// sections in tag order, entries sorted by key bytes — so it never depends on dictionary iteration order.
/// Leaf = section tag ‖ key ‖ value in the canonical binary encoding.
extension LedgerState {
    enum Section: UInt8 {
        case meta = 0, balance = 1, stake = 2, node = 3, validator = 4, dedup = 5, evidence = 6, escrow = 7
        case settlement = 8, settlementCursor = 9, heldPayout = 10, receiptNotice = 11, routerDefault = 12, dataRequest = 13, omissionQuery = 14
    }

    public func stateRoot() -> Hash32 { MerkleTree.root(leaves: stateLeaves()) }

    func stateLeaves() -> [[UInt8]] {
        var leaves = [[UInt8]]()
        leaves.reserveCapacity(1 + balances.count + stakes.count + nodes.count + activeValidators.count + dedup.count + usedEvidence.count + escrows.count)

        var meta = ByteWriter()
        meta.write(Section.meta.rawValue)
        meta.write(chainID)
        meta.write(height)
        meta.write(lastBlockTimeMillis)
        totalSupply.encode(to: &meta)
        burned.encode(to: &meta)
        meta.write(nextStakeID)
        leaves.append(meta.bytes)

        func keyed<K>(_ section: Section, _ items: [(K, [UInt8])], key: (K) -> [UInt8], value: (K) -> (inout ByteWriter) -> Void) {
            var entries = items.map { (key: key($0.0), item: $0.0) }
            entries.sort { $0.key.lexicographicallyPrecedes($1.key) }
            for entry in entries {
                var w = ByteWriter()
                w.write(section.rawValue)
                w.writeRaw(entry.key)
                value(entry.item)(&w)
                leaves.append(w.bytes)
            }
        }

        keyed(.balance, balances.map { ($0.key, []) }, key: { $0.canonicalBytes }) { account in
            { w in w.write(self.balances[account] ?? 0) }
        }
        keyed(.stake, stakes.map { ($0.key, []) }, key: { id in var w = ByteWriter(); w.write(id); return w.bytes }) { id in
            { w in
                let s = self.stakes[id]!
                s.owner.encode(to: &w)
                w.write(s.role.tag)
                s.amount.encode(to: &w)
                w.write(s.lockDays)
                w.write(s.bondedAtMillis)
                w.write(s.unlocksAtMillis)
                w.write(s.status == .bonded)
            }
        }
        keyed(.node, nodes.map { ($0.key, []) }, key: { $0.rawRepresentation }) { key in
            { w in
                let n = self.nodes[key]!
                n.owner.encode(to: &w)
                w.write(n.role.tag)
                w.write(Endpoints.encode(n.endpoints))
                w.write(n.stakeID)
                w.write(n.registeredAt.height)
                w.write(n.registeredAt.index)
                w.write(n.status == .active)
                w.write(n.routerFeeBps)
                n.prices.encode(to: &w)
                n.priorPrices.encode(to: &w)
            }
        }
        keyed(.validator, activeValidators.map { ($0.key, []) }, key: { $0.rawRepresentation }) { key in
            { w in w.write(self.activeValidators[key] ?? 0) }
        }
        keyed(.dedup, dedup.map { ($0.key, []) }, key: { $0.bytes }) { id in
            { w in
                let e = self.dedup[id]!
                w.write(e.location.height)
                w.write(e.location.index)
                w.write(e.createdAtMillis)
            }
        }
        keyed(.evidence, usedEvidence.map { ($0, []) }, key: { $0.bytes }) { _ in { _ in } }
        keyed(.escrow, escrows.map { ($0.key, []) }, key: { $0.keyBytes }) { key in
            { w in
                let e = self.escrows[key]!
                e.balance.encode(to: &w)
                e.pending.encode(to: &w)
                if let due = e.withdrawableAtHeight { w.write(true); w.write(due) } else { w.write(false) }
            }
        }
        keyed(.settlement, settlements.map { ($0.key, []) }, key: { $0.keyBytes }) { key in
            { w in
                let s = self.settlements[key]!
                w.write(s.firstSequence)
                w.write(s.lastSequence)
                w.write(s.epoch)
                w.write(s.includedAtHeight)
                w.write(s.finalAtHeight)
                w.writeRaw(s.tx.bytes)
                w.writeRaw(s.commitment.bytes)
                w.write(s.receiptCount)
                w.write(s.pairCount)
                s.total.encode(to: &w)
                w.write(s.routerFeeBps)
                w.write(s.protocolFeeBps)
                w.write(s.status.tag)
                w.write(UInt32(truncatingIfNeeded: s.entries.count))
                for entry in s.entries { entry.encode(to: &w) }
                w.write(UInt32(truncatingIfNeeded: s.reverted.count))
                for amount in s.reverted { w.write(amount) }
                w.write(s.upheldChallenges)
            }
        }
        keyed(.settlementCursor, settlementCursors.map { ($0.key, []) }, key: { $0.rawRepresentation }) { router in
            { w in
                let c = self.settlementCursors[router]!
                w.write(c.nextBatch)
                w.write(c.nextSequence)
            }
        }
        // Held payouts keep their order within a release height: key = u64 height ‖ u32 position.
        let held = heldPayouts.flatMap { height, list in list.enumerated().map { (HeldPayoutPosition(height: height, index: UInt32(truncatingIfNeeded: $0.offset)), $0.element) } }
        keyed(.heldPayout, held.map { ($0.0, []) }, key: { $0.keyBytes }) { position in
            { w in
                let p = self.heldPayouts[position.height]![Int(position.index)]
                p.node.encode(to: &w)
                p.owner.encode(to: &w)
                p.amount.encode(to: &w)
                w.writeRaw(p.settlement.keyBytes)
            }
        }
        keyed(.receiptNotice, receiptNotices.map { ($0.key, []) }, key: { $0.keyBytes }) { key in
            { w in
                let n = self.receiptNotices[key]!
                n.payer.encode(to: &w)
                w.writeRaw(n.node.rawRepresentation)
                w.write(n.amount)
                w.write(n.charged)
                w.write(n.noticedAtHeight)
                w.write(n.dueAtHeight)
                w.writeRaw(n.tx.bytes)
                w.write(n.status.tag)
                w.write(n.settledAtHeight)
            }
        }
        keyed(.routerDefault, routerDefaults.map { ($0.key, []) }, key: { $0.rawRepresentation }) { router in
            { w in w.write(self.routerDefaults[router] ?? 0) }
        }
        keyed(.dataRequest, dataRequests.map { ($0.key, []) }, key: { $0.keyBytes }) { key in
            { w in
                let r = self.dataRequests[key]!
                r.requester.encode(to: &w)
                r.bond.encode(to: &w)
                w.write(r.requestedAtHeight)
                w.write(r.dueAtHeight)
                w.writeRaw(r.tx.bytes)
                w.write(r.status.tag)
                w.write(r.resolvedAtHeight)
                w.write(r.received.leafCount)
                w.write(r.received.total)
                let frontier = r.received.frontier
                w.write(UInt8(truncatingIfNeeded: frontier.count))
                for node in frontier {
                    if let node {
                        w.write(UInt8(1))
                        node.encode(to: &w)
                    } else {
                        w.write(UInt8(0))
                    }
                }
            }
        }
        keyed(.omissionQuery, omissionQueries.map { ($0.key, []) }, key: { $0.keyBytes }) { key in
            { w in
                let q = self.omissionQueries[key]!
                q.requester.encode(to: &w)
                q.bond.encode(to: &w)
                w.write(q.worth)
                w.write(q.requestedAtHeight)
                w.write(q.dueAtHeight)
                w.writeRaw(q.tx.bytes)
                w.write(q.status.tag)
                w.write(q.resolvedAtHeight)
            }
        }
        return leaves
    }
}

/// Where a held payout sits: its release height and its position among that height's payouts.
struct HeldPayoutPosition: Hashable {
    let height: UInt64
    let index: UInt32

    var keyBytes: [UInt8] {
        var writer = ByteWriter(capacity: 12)
        writer.write(height)
        writer.write(index)
        return writer.bytes
    }
}
