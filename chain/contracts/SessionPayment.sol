// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import "./Roles.sol";

/// Session money (Cortensor's SessionPayment): deposits into sessions, holds for running tasks,
/// payment from a session to the network, allocation of the network's balance to nodes, and
/// withdrawal by the nodes themselves.
///
/// Conservation, at every point: totalDeposited ==
///     sum(sessionBalances) + sum(sessionHeld) + totalNetworkBalance + sum(nodePendingPayments)
///     + totalWithdrawn.
/// `holdBatch` holds for many tasks in one transaction, each task key at most once; `settleBatch`
/// settles many tasks in one transaction (batch settlement), each task key at most once, and
/// never releases more than the key's own hold.
contract SessionPayment is Roles {
    mapping(uint256 => uint256) public sessionBalances;
    mapping(uint256 => uint256) public sessionHeld;
    mapping(uint256 => uint256) public sessionNetworkUsage;
    mapping(address => uint256) public nodePendingPayments;
    mapping(bytes32 => bool) public settled;
    /// Holds made under a task key, in one slot: 0 none, REFUSED_HOLD refused, else the
    /// amount plus one.
    mapping(bytes32 => uint256) public keyedHolds;
    uint256 public constant REFUSED_HOLD = type(uint256).max;
    uint256 public totalNetworkBalance;
    uint256 public totalDeposited;
    uint256 public totalWithdrawn;

    event Deposited(uint256 indexed sessionId, address indexed from, uint256 amount);
    event Held(uint256 indexed sessionId, uint256 amount);
    event HoldReleased(uint256 indexed sessionId, uint256 amount);
    event PaidToNetwork(uint256 indexed sessionId, uint256 amount);
    event NodePaymentAllocated(address indexed node, uint256 amount);
    event NodePaymentWithdrawn(address indexed node, uint256 amount);
    event BatchSettled(bytes32 indexed root, uint256 tasks, uint256 charged);
    event HoldRefused(bytes32 indexed key, uint256 indexed sessionId, uint256 needed, uint256 available);

    error InsufficientBalance(uint256 sessionId, uint256 needed, uint256 available);
    error InsufficientNetworkBalance(uint256 needed, uint256 available);
    error LengthMismatch();
    error NothingToWithdraw();
    error TransferFailed();

    function depositToSession(uint256 sessionId) external payable {
        sessionBalances[sessionId] += msg.value;
        totalDeposited += msg.value;
        emit Deposited(sessionId, msg.sender, msg.value);
    }

    /// Moves `amount` of a session's balance to its held funds (a task's budget).
    function hold(uint256 sessionId, uint256 amount) public onlyRole(SESSION_CONTRACT) {
        uint256 available = sessionBalances[sessionId];
        if (available < amount) revert InsufficientBalance(sessionId, amount, available);
        sessionBalances[sessionId] = available - amount;
        sessionHeld[sessionId] += amount;
        emit Held(sessionId, amount);
    }

    /// Holds for many tasks at once: each key's amount moves from its session's balance to its
    /// held funds, or the key is marked refused when the balance cannot cover it. A key seen
    /// before is skipped, so a repeated batch changes nothing.
    function holdBatch(bytes32[] calldata keys, uint256[] calldata sessionIds, uint256[] calldata amounts)
        external
        onlyRole(SESSION_CONTRACT)
    {
        uint256 n = keys.length;
        if (sessionIds.length != n || amounts.length != n) revert LengthMismatch();
        for (uint256 i = 0; i < n; i++) {
            if (keyedHolds[keys[i]] != 0) continue;
            uint256 available = sessionBalances[sessionIds[i]];
            if (available < amounts[i] || amounts[i] == REFUSED_HOLD) {
                keyedHolds[keys[i]] = REFUSED_HOLD;
                emit HoldRefused(keys[i], sessionIds[i], amounts[i], available);
                continue;
            }
            sessionBalances[sessionIds[i]] = available - amounts[i];
            sessionHeld[sessionIds[i]] += amounts[i];
            keyedHolds[keys[i]] = amounts[i] + 1;
            emit Held(sessionIds[i], amounts[i]);
        }
    }

    function releaseHold(uint256 sessionId, uint256 amount) external onlyRole(SESSION_CONTRACT) {
        _release(sessionId, amount, 0);
    }

    /// Pays `amount` from a session's balance to the network (unallocated until allocated).
    function payFromSessionToNetwork(uint256 sessionId, uint256 amount) external onlyRole(SESSION_CONTRACT) {
        uint256 available = sessionBalances[sessionId];
        if (available < amount) revert InsufficientBalance(sessionId, amount, available);
        sessionBalances[sessionId] = available - amount;
        sessionNetworkUsage[sessionId] += amount;
        totalNetworkBalance += amount;
        emit PaidToNetwork(sessionId, amount);
    }

    /// Allocates the network's balance to nodes' pending payments.
    function allocateNodePayments(address[] calldata nodes, uint256[] calldata amounts) public onlyRole(SESSION_CONTRACT) {
        if (nodes.length != amounts.length) revert LengthMismatch();
        for (uint256 i = 0; i < nodes.length; i++) {
            if (totalNetworkBalance < amounts[i]) revert InsufficientNetworkBalance(amounts[i], totalNetworkBalance);
            totalNetworkBalance -= amounts[i];
            nodePendingPayments[nodes[i]] += amounts[i];
            emit NodePaymentAllocated(nodes[i], amounts[i]);
        }
    }

    /// A node collects what it has earned; only the node itself can.
    function withdrawNodePayment() external {
        uint256 amount = nodePendingPayments[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        nodePendingPayments[msg.sender] = 0;
        totalWithdrawn += amount;
        emit NodePaymentWithdrawn(msg.sender, amount);
        (bool ok, ) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    /// Settles many tasks at once: for each task key, its hold ends and `charges[i]` of it goes
    /// to the network; then the network's new balance is allocated to `nodes`. `root` commits to
    /// the batch's results (a Merkle root) and is only logged. A key settled before is skipped.
    function settleBatch(
        bytes32 root,
        bytes32[] calldata taskKeys,
        uint256[] calldata sessionIds,
        uint256[] calldata holds,
        uint256[] calldata charges,
        address[] calldata nodes,
        uint256[] calldata amounts
    ) external onlyRole(SESSION_CONTRACT) {
        uint256 n = taskKeys.length;
        if (sessionIds.length != n || holds.length != n || charges.length != n) revert LengthMismatch();
        uint256 charged;
        for (uint256 i = 0; i < n; i++) {
            bytes32 key = taskKeys[i];
            if (settled[key]) continue;
            settled[key] = true;
            uint256 amount = _releasable(key, holds[i]);
            uint256 held = sessionHeld[sessionIds[i]];
            if (amount > held) amount = held;
            _release(sessionIds[i], amount, charges[i]);
            charged += charges[i] < amount ? charges[i] : amount;
        }
        allocateNodePayments(nodes, amounts);
        emit BatchSettled(root, n, charged);
    }

    /// What `settleBatch` would charge each task, given the same arguments now (0 for a key
    /// settled before or repeated in the batch): lets a router split the charges among nodes
    /// with one call.
    function settleCharges(
        bytes32[] calldata taskKeys,
        uint256[] calldata sessionIds,
        uint256[] calldata holds,
        uint256[] calldata charges
    ) external view returns (uint256[] memory charged) {
        uint256 n = taskKeys.length;
        if (sessionIds.length != n || holds.length != n || charges.length != n) revert LengthMismatch();
        charged = new uint256[](n);
        uint256[] memory released = new uint256[](n);
        for (uint256 i = 0; i < n; i++) {
            bytes32 key = taskKeys[i];
            if (settled[key]) continue;
            bool repeated;
            uint256 held = sessionHeld[sessionIds[i]];
            for (uint256 j = 0; j < i; j++) {
                if (taskKeys[j] == key) repeated = true;
                if (sessionIds[j] == sessionIds[i]) held -= released[j];
            }
            if (repeated) continue;
            uint256 amount = _releasable(key, holds[i]);
            if (amount > held) amount = held;
            released[i] = amount;
            charged[i] = charges[i] < amount ? charges[i] : amount;
        }
    }

    /// What a task's settlement may release: at most its keyed hold (nothing if refused).
    function _releasable(bytes32 key, uint256 amount) internal view returns (uint256) {
        uint256 k = keyedHolds[key];
        if (k == REFUSED_HOLD) return 0;
        if (k != 0 && k - 1 < amount) return k - 1;
        return amount;
    }

    /// Ends a hold: `charge` (at most the hold) goes to the network, the rest back to the balance.
    function _release(uint256 sessionId, uint256 amount, uint256 charge) internal {
        uint256 held = sessionHeld[sessionId];
        if (amount > held) amount = held;
        if (charge > amount) charge = amount;
        sessionHeld[sessionId] = held - amount;
        sessionBalances[sessionId] += amount - charge;
        sessionNetworkUsage[sessionId] += charge;
        totalNetworkBalance += charge;
        emit HoldReleased(sessionId, amount);
        if (charge > 0) emit PaidToNetwork(sessionId, charge);
    }
}
