// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// Minimal role-based access shared by the network's contracts: ADMIN manages roles; other
/// roles are granted to contracts (SESSION_CONTRACT, QUEUE_CONTRACT) or operators (ROUTER,
/// REPORTER).
abstract contract Roles {
    bytes32 public constant ADMIN = keccak256("ADMIN");
    bytes32 public constant SESSION_CONTRACT = keccak256("SESSION_CONTRACT");
    bytes32 public constant QUEUE_CONTRACT = keccak256("QUEUE_CONTRACT");
    bytes32 public constant ROUTER = keccak256("ROUTER");
    bytes32 public constant REPORTER = keccak256("REPORTER");

    mapping(bytes32 => mapping(address => bool)) public hasRole;

    event RoleGranted(bytes32 indexed role, address indexed account);
    event RoleRevoked(bytes32 indexed role, address indexed account);

    error MissingRole(bytes32 role, address account);

    constructor() {
        hasRole[ADMIN][msg.sender] = true;
        emit RoleGranted(ADMIN, msg.sender);
    }

    modifier onlyRole(bytes32 role) {
        if (!hasRole[role][msg.sender]) revert MissingRole(role, msg.sender);
        _;
    }

    function grantRole(bytes32 role, address account) external onlyRole(ADMIN) {
        hasRole[role][account] = true;
        emit RoleGranted(role, account);
    }

    function revokeRole(bytes32 role, address account) external onlyRole(ADMIN) {
        hasRole[role][account] = false;
        emit RoleRevoked(role, account);
    }
}
