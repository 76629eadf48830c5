// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import "./Roles.sol";

/// The task queue of sessions (Cortensor's SessionQueueV2): tasks are enqueued by the session
/// contract, assigned by a router, acknowledged, precommitted (a hash of the result) and
/// committed (the result, checked against its hash) by their assigned miners, and ended by the
/// router, by force after a deadline.
contract SessionQueueV2 is Roles {
    enum Status { None, Queued, Assigned, Acked, Precommitted, Committed, Ended }

    struct Task {
        uint256 id;
        uint256 sessionId;
        bytes data;
        address[] assignedMiners;
        bool ended;
        bool forceEnded;
        Status status;
        uint256 createdAt;
        uint256 lastPrecommitAt;
        uint256 lastCommitAt;
        uint256 finishedAt;
    }

    struct MinerRecord {
        bool assigned;
        uint256 ackAt;
        bytes32 precommitHash;
        uint256 precommitAt;
        uint256 commitAt;
        bytes result;
    }

    mapping(uint256 => mapping(uint256 => Task)) internal tasks;
    mapping(uint256 => mapping(uint256 => mapping(address => MinerRecord))) internal minerRecords;
    mapping(uint256 => uint256) public taskCount;
    mapping(uint256 => mapping(uint256 => uint256)) internal precommits;
    mapping(uint256 => mapping(uint256 => uint256)) internal commits;
    /// Tasks enqueued with an idempotency key (a router's own task key): key => task id.
    mapping(bytes32 => uint256) public taskIdByKey;

    event TaskQueued(uint256 indexed sessionId, uint256 indexed taskId, bytes data);
    event TaskAssigned(uint256 indexed sessionId, uint256 indexed taskId, address[] miners, uint256 modelIdentifier);
    event TaskAcked(uint256 indexed sessionId, uint256 indexed taskId, address miner);
    event TaskAckEnded(uint256 indexed sessionId, uint256 indexed taskId);
    event TaskPrecommitted(uint256 indexed sessionId, uint256 indexed taskId, address miner, bytes32 hash);
    event TaskAllPrecommitted(uint256 indexed sessionId, uint256 indexed taskId);
    event TaskPrecommitEnded(uint256 indexed sessionId, uint256 indexed taskId);
    event TaskCommitted(uint256 indexed sessionId, uint256 indexed taskId, address miner);
    event TaskAllCommitted(uint256 indexed sessionId, uint256 indexed taskId);
    event TaskCommitEnded(uint256 indexed sessionId, uint256 indexed taskId);
    event TaskEnded(uint256 indexed sessionId, uint256 indexed taskId, bool forceEnd);

    error NoSuchTask(uint256 sessionId, uint256 taskId);
    error NotAssigned(uint256 sessionId, uint256 taskId, address miner);
    error WrongStage(uint256 sessionId, uint256 taskId, Status status);
    error AlreadyDone(uint256 sessionId, uint256 taskId, address miner);
    error HashMismatch(uint256 sessionId, uint256 taskId, address miner);

    function enqueueTask(uint256 sessionId, bytes calldata data) external onlyRole(SESSION_CONTRACT) returns (uint256) {
        return _enqueue(sessionId, data);
    }

    /// Enqueues once per `key`: a repeat (a router re-sending after a lost receipt) returns the
    /// task enqueued the first time.
    function enqueueTaskWithKey(uint256 sessionId, bytes32 key, bytes calldata data) external onlyRole(SESSION_CONTRACT) returns (uint256 taskId) {
        taskId = taskIdByKey[key];
        if (taskId != 0) return taskId;
        taskId = _enqueue(sessionId, data);
        taskIdByKey[key] = taskId;
    }

    /// Assigns (or adds, for replacements) miners to a live task.
    function assignTask(uint256 sessionId, uint256 taskId, address[] calldata miners, uint256 modelIdentifier) external onlyRole(ROUTER) {
        Task storage t = _live(sessionId, taskId);
        for (uint256 i = 0; i < miners.length; i++) {
            MinerRecord storage r = minerRecords[sessionId][taskId][miners[i]];
            if (!r.assigned) {
                r.assigned = true;
                t.assignedMiners.push(miners[i]);
            }
        }
        if (t.status == Status.Queued) t.status = Status.Assigned;
        emit TaskAssigned(sessionId, taskId, miners, modelIdentifier);
    }

    function ack(uint256 sessionId, uint256 taskId) external {
        _live(sessionId, taskId);
        MinerRecord storage r = _assigned(sessionId, taskId);
        if (r.ackAt != 0) revert AlreadyDone(sessionId, taskId, msg.sender);
        r.ackAt = block.timestamp;
        emit TaskAcked(sessionId, taskId, msg.sender);
    }

    function endAck(uint256 sessionId, uint256 taskId) external onlyRole(ROUTER) {
        Task storage t = _live(sessionId, taskId);
        if (t.status == Status.Assigned) t.status = Status.Acked;
        emit TaskAckEnded(sessionId, taskId);
    }

    function precommit(uint256 sessionId, uint256 taskId, bytes32 hash) external {
        Task storage t = _live(sessionId, taskId);
        if (t.status == Status.Precommitted || t.status == Status.Committed) revert WrongStage(sessionId, taskId, t.status);
        MinerRecord storage r = _assigned(sessionId, taskId);
        if (r.precommitAt != 0) revert AlreadyDone(sessionId, taskId, msg.sender);
        if (r.ackAt == 0) r.ackAt = block.timestamp;
        r.precommitHash = hash;
        r.precommitAt = block.timestamp;
        t.lastPrecommitAt = block.timestamp;
        emit TaskPrecommitted(sessionId, taskId, msg.sender, hash);
        if (++precommits[sessionId][taskId] == t.assignedMiners.length) {
            t.status = Status.Precommitted;
            emit TaskAllPrecommitted(sessionId, taskId);
        }
    }

    function endPrecommit(uint256 sessionId, uint256 taskId) external onlyRole(ROUTER) {
        Task storage t = _live(sessionId, taskId);
        t.status = Status.Precommitted;
        emit TaskPrecommitEnded(sessionId, taskId);
    }

    /// Reveals a result; it must hash to the miner's precommit, and the precommit stage must be
    /// over (all precommitted, or ended by the router).
    function commit(uint256 sessionId, uint256 taskId, bytes calldata data) external {
        Task storage t = _live(sessionId, taskId);
        if (t.status != Status.Precommitted && t.status != Status.Committed) revert WrongStage(sessionId, taskId, t.status);
        MinerRecord storage r = _assigned(sessionId, taskId);
        if (r.commitAt != 0) revert AlreadyDone(sessionId, taskId, msg.sender);
        if (r.precommitAt == 0 || keccak256(data) != r.precommitHash) revert HashMismatch(sessionId, taskId, msg.sender);
        r.result = data;
        r.commitAt = block.timestamp;
        t.lastCommitAt = block.timestamp;
        emit TaskCommitted(sessionId, taskId, msg.sender);
        if (++commits[sessionId][taskId] == precommits[sessionId][taskId]) {
            t.status = Status.Committed;
            emit TaskAllCommitted(sessionId, taskId);
        }
    }

    function endCommit(uint256 sessionId, uint256 taskId) external onlyRole(ROUTER) {
        Task storage t = _live(sessionId, taskId);
        t.status = Status.Committed;
        emit TaskCommitEnded(sessionId, taskId);
    }

    function end(uint256 sessionId, uint256 taskId, bool forceEnd) external onlyRole(ROUTER) {
        Task storage t = _live(sessionId, taskId);
        t.ended = true;
        t.forceEnded = forceEnd;
        t.status = Status.Ended;
        t.finishedAt = block.timestamp;
        emit TaskEnded(sessionId, taskId, forceEnd);
    }

    function getTask(uint256 sessionId, uint256 taskId) external view returns (Task memory) {
        return _existing(sessionId, taskId);
    }

    /// The committed results and who committed them, in assignment order.
    function getTaskResults(uint256 sessionId, uint256 taskId) public view returns (address[] memory miners, bytes[] memory results) {
        Task storage t = _existing(sessionId, taskId);
        uint256 n = commits[sessionId][taskId];
        miners = new address[](n);
        results = new bytes[](n);
        uint256 k;
        for (uint256 i = 0; i < t.assignedMiners.length && k < n; i++) {
            MinerRecord storage r = minerRecords[sessionId][taskId][t.assignedMiners[i]];
            if (r.commitAt != 0) {
                miners[k] = t.assignedMiners[i];
                results[k] = r.result;
                k++;
            }
        }
    }

    function getTaskResultsAndHashes(uint256 sessionId, uint256 taskId)
        external
        view
        returns (address[] memory miners, bytes[] memory results, bytes32[] memory hashes)
    {
        (miners, results) = getTaskResults(sessionId, taskId);
        hashes = new bytes32[](miners.length);
        for (uint256 i = 0; i < miners.length; i++) {
            hashes[i] = minerRecords[sessionId][taskId][miners[i]].precommitHash;
        }
    }

    /// One miner's record of one task: assigned, ack / precommit / commit times, hash, result.
    function getMinerRecord(uint256 sessionId, uint256 taskId, address miner) external view returns (MinerRecord memory) {
        _existing(sessionId, taskId);
        return minerRecords[sessionId][taskId][miner];
    }

    function getHash(uint256 sessionId, uint256 taskId, address miner) external view returns (bytes32) {
        return minerRecords[sessionId][taskId][miner].precommitHash;
    }

    function verifyHash(bytes calldata data, bytes32 hash) external pure returns (bool) {
        return keccak256(data) == hash;
    }

    function _enqueue(uint256 sessionId, bytes calldata data) internal returns (uint256 taskId) {
        taskId = ++taskCount[sessionId];
        Task storage t = tasks[sessionId][taskId];
        t.id = taskId;
        t.sessionId = sessionId;
        t.data = data;
        t.status = Status.Queued;
        t.createdAt = block.timestamp;
        emit TaskQueued(sessionId, taskId, data);
    }

    function _existing(uint256 sessionId, uint256 taskId) internal view returns (Task storage t) {
        t = tasks[sessionId][taskId];
        if (t.status == Status.None) revert NoSuchTask(sessionId, taskId);
    }

    function _live(uint256 sessionId, uint256 taskId) internal view returns (Task storage t) {
        t = _existing(sessionId, taskId);
        if (t.ended) revert WrongStage(sessionId, taskId, t.status);
    }

    function _assigned(uint256 sessionId, uint256 taskId) internal view returns (MinerRecord storage r) {
        r = minerRecords[sessionId][taskId][msg.sender];
        if (!r.assigned) revert NotAssigned(sessionId, taskId, msg.sender);
    }
}
