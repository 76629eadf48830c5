// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import "./Roles.sol";

/// Node statistics and levels (Cortensor's NodeStats / NodeReputation): counters of successes
/// and failures, tokens served, and a level 0..10 that rises after `upgradeStreak` successes in
/// a row and falls after `downgradeStreak` failures in a row.
contract NodeReputation is Roles {
    uint8 public constant MAX_LEVEL = 10;

    struct Stats {
        uint64 successes;
        uint64 failures;
        uint64 consecutiveSuccesses;
        uint64 consecutiveFailures;
        uint128 tokens;
        uint8 level;
        uint256 lastSuccessAt;
    }

    uint64 public immutable upgradeStreak;
    uint64 public immutable downgradeStreak;
    mapping(address => Stats) public stats;

    event TaskCompletionReported(address indexed node, bool success, uint256 tokenCount);
    event NodeLevelChanged(address indexed node, uint8 from, uint8 to);

    constructor(uint64 upgradeStreak_, uint64 downgradeStreak_) {
        upgradeStreak = upgradeStreak_;
        downgradeStreak = downgradeStreak_;
    }

    error LengthMismatch();
    error LevelOutOfRange(uint8 level);

    function reportTaskCompletion(address node, bool success, uint256 tokenCount) external onlyRole(REPORTER) {
        _report(node, success, tokenCount);
    }

    /// Many outcomes in one transaction, with each node's level as the router's finer rules
    /// (per-level streaks and success rates) set it after that outcome.
    function reportBatch(
        address[] calldata nodes,
        bool[] calldata success,
        uint256[] calldata tokenCounts,
        uint8[] calldata levels
    ) external onlyRole(REPORTER) {
        if (nodes.length != success.length || nodes.length != tokenCounts.length || nodes.length != levels.length) {
            revert LengthMismatch();
        }
        for (uint256 i = 0; i < nodes.length; i++) {
            if (levels[i] > MAX_LEVEL) revert LevelOutOfRange(levels[i]);
            _report(nodes[i], success[i], tokenCounts[i]);
            Stats storage s = stats[nodes[i]];
            if (s.level != levels[i]) {
                emit NodeLevelChanged(nodes[i], s.level, levels[i]);
                s.level = levels[i];
            }
        }
    }

    function _report(address node, bool success, uint256 tokenCount) internal {
        Stats storage s = stats[node];
        uint8 before = s.level;
        if (success) {
            s.successes += 1;
            s.consecutiveSuccesses += 1;
            s.consecutiveFailures = 0;
            s.tokens += uint128(tokenCount);
            s.lastSuccessAt = block.timestamp;
            if (s.consecutiveSuccesses >= upgradeStreak && s.level < MAX_LEVEL) {
                s.level += 1;
                s.consecutiveSuccesses = 0;
            }
        } else {
            s.failures += 1;
            s.consecutiveFailures += 1;
            s.consecutiveSuccesses = 0;
            if (s.consecutiveFailures >= downgradeStreak && s.level > 0) {
                s.level -= 1;
                s.consecutiveFailures = 0;
            }
        }
        emit TaskCompletionReported(node, success, tokenCount);
        if (s.level != before) emit NodeLevelChanged(node, before, s.level);
    }
}
