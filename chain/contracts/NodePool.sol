// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import "./Roles.sol";

/// The node registry (Cortensor's node pool): nodes register with a stake and their model, and
/// move between ephemeral (in the pool), reserved (held by a session), released (must be
/// revalidated before rejoining), dedicated (pinned to a session) and suspended.
contract NodePool is Roles {
    enum State { Unregistered, Ephemeral, Reserved, Released, Dedicated, Suspended }

    struct Node {
        State state;
        uint256 stake;
        string model;
        uint256 sessionId;
        uint256 registeredAt;
    }

    uint256 public immutable minStake;
    mapping(address => Node) public nodes;
    address[] public nodeList;

    event NodeRegistered(address indexed node, string model, uint256 stake);
    event NodeStateChanged(address indexed node, State state, uint256 sessionId);
    event NodeReleased(address indexed node, uint256 sessionId);
    event NodeUnregistered(address indexed node, uint256 stake);

    error StakeTooLow(uint256 given, uint256 needed);
    error AlreadyRegistered(address node);
    error NotRegistered(address node);
    error WrongState(address node, State state);
    error TransferFailed();

    constructor(uint256 minStake_) {
        minStake = minStake_;
    }

    function register(string calldata model) external payable {
        if (nodes[msg.sender].state != State.Unregistered) revert AlreadyRegistered(msg.sender);
        if (msg.value < minStake) revert StakeTooLow(msg.value, minStake);
        nodes[msg.sender] = Node(State.Ephemeral, msg.value, model, 0, block.timestamp);
        nodeList.push(msg.sender);
        emit NodeRegistered(msg.sender, model, msg.value);
    }

    /// A node leaves and takes its stake back; only from the pool, never while holding work.
    function unregister() external {
        Node storage n = nodes[msg.sender];
        if (n.state != State.Ephemeral && n.state != State.Released) revert WrongState(msg.sender, n.state);
        uint256 stake = n.stake;
        delete nodes[msg.sender];
        emit NodeUnregistered(msg.sender, stake);
        (bool ok, ) = msg.sender.call{value: stake}("");
        if (!ok) revert TransferFailed();
    }

    function reserve(address node, uint256 sessionId) external onlyRole(ROUTER) {
        _move(node, State.Ephemeral, State.Reserved, sessionId);
    }

    function dedicate(address node, uint256 sessionId) external onlyRole(ROUTER) {
        _move(node, State.Ephemeral, State.Dedicated, sessionId);
    }

    function releaseByNodeId(address node) external onlyRole(ROUTER) {
        Node storage n = nodes[node];
        if (n.state != State.Reserved && n.state != State.Dedicated) revert WrongState(node, n.state);
        uint256 sessionId = n.sessionId;
        n.state = State.Released;
        n.sessionId = 0;
        emit NodeReleased(node, sessionId);
        emit NodeStateChanged(node, State.Released, 0);
    }

    /// A released node that passed validation again rejoins the pool.
    function revalidate(address node) external onlyRole(ROUTER) {
        _move(node, State.Released, State.Ephemeral, 0);
    }

    function suspend(address node) external onlyRole(ADMIN) {
        Node storage n = nodes[node];
        if (n.state == State.Unregistered) revert NotRegistered(node);
        n.state = State.Suspended;
        n.sessionId = 0;
        emit NodeStateChanged(node, State.Suspended, 0);
    }

    function unsuspend(address node) external onlyRole(ADMIN) {
        _move(node, State.Suspended, State.Released, 0);
    }

    function nodeCount() external view returns (uint256) {
        return nodeList.length;
    }

    function _move(address node, State from, State to, uint256 sessionId) internal {
        Node storage n = nodes[node];
        if (n.state != from) revert WrongState(node, n.state);
        n.state = to;
        n.sessionId = sessionId;
        emit NodeStateChanged(node, to, sessionId);
    }
}
