// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import "./Roles.sol";
import "./SessionPayment.sol";
import "./SessionQueueV2.sol";

/// The session registry (Cortensor's SessionV2): users create sessions with Cortensor's
/// parameters and attach routers; only a session's owner changes it; only its routers submit
/// tasks, each holding `maxTokens × redundant × pricePerToken` of the session's balance.
contract SessionV2 is Roles {
    struct Params {
        string name;
        string metadata;
        address variableAddress;
        uint32 minNumOfNodes;
        uint32 maxNumOfNodes;
        uint32 redundant;
        uint32 numOfValidatorNodes;
        uint8 mode;
        bool reserveEphemeralNodes;
        uint8 sla;
        uint32 modelIdentifier;
        uint64 reservePeriod;
        uint32 maxTaskExecutionCount;
    }

    struct Session {
        uint256 id;
        address owner;
        Params params;
        bool active;
        uint256 createdAt;
    }

    uint32 public constant MAX_NODES = 16;

    SessionQueueV2 public immutable queue;
    SessionPayment public immutable payment;
    uint256 public immutable pricePerToken;
    uint256 public sessionCount;
    mapping(uint256 => Session) internal sessions;
    mapping(uint256 => mapping(address => bool)) public isRouter;
    mapping(uint256 => address[]) internal dedicatedNodes;

    event SessionCreated(uint256 indexed sessionId, address indexed owner, string name);
    event SessionUpdated(uint256 indexed sessionId);
    event SessionDeactivated(uint256 indexed sessionId);
    event RouterAdded(uint256 indexed sessionId, address router);
    event DedicatedNodeAdded(uint256 indexed sessionId, address node);
    event TaskSubmitted(uint256 indexed sessionId, uint256 indexed taskId, uint256 hold, string clientReference);

    error NoSuchSession(uint256 sessionId);
    error NotOwner(uint256 sessionId, address caller);
    error NotRouter(uint256 sessionId, address caller);
    error Inactive(uint256 sessionId);
    error InvalidParams(string reason);

    constructor(SessionQueueV2 queue_, SessionPayment payment_, uint256 pricePerToken_) {
        queue = queue_;
        payment = payment_;
        pricePerToken = pricePerToken_;
    }

    function create(Params calldata p) external returns (uint256 sessionId) {
        _validate(p);
        sessionId = ++sessionCount;
        Session storage s = sessions[sessionId];
        s.id = sessionId;
        s.owner = msg.sender;
        s.params = p;
        s.active = true;
        s.createdAt = block.timestamp;
        emit SessionCreated(sessionId, msg.sender, p.name);
    }

    function update(uint256 sessionId, Params calldata p) external {
        Session storage s = _owned(sessionId);
        _validate(p);
        s.params = p;
        emit SessionUpdated(sessionId);
    }

    function deactivate(uint256 sessionId) external {
        _owned(sessionId).active = false;
        emit SessionDeactivated(sessionId);
    }

    function addRouter(uint256 sessionId, address router) external {
        _owned(sessionId);
        isRouter[sessionId][router] = true;
        emit RouterAdded(sessionId, router);
    }

    function addDedicatedNode(uint256 sessionId, address node) external {
        _owned(sessionId);
        dedicatedNodes[sessionId].push(node);
        emit DedicatedNodeAdded(sessionId, node);
    }

    /// Cortensor's submit: llmParams are [maxTokens, temperature×100, topP×100, topK,
    /// repeatPenalty×100, presencePenalty, frequencyPenalty].
    function submit(
        uint256 sessionId,
        uint256, /* nodeType */
        bytes calldata taskData,
        uint256, /* promptType */
        string calldata, /* promptTemplate */
        uint256[] calldata llmParams,
        uint256[] calldata, /* requestParams */
        string calldata clientReference
    ) external returns (uint256 taskId) {
        Session storage s = _existing(sessionId);
        if (!isRouter[sessionId][msg.sender]) revert NotRouter(sessionId, msg.sender);
        if (!s.active) revert Inactive(sessionId);
        if (llmParams.length == 0 || llmParams[0] == 0) revert InvalidParams("llmParams[0] (maxTokens) must be above 0");
        uint256 amount = llmParams[0] * s.params.redundant * pricePerToken;
        payment.hold(sessionId, amount);
        taskId = queue.enqueueTask(sessionId, taskData);
        emit TaskSubmitted(sessionId, taskId, amount, clientReference);
    }

    function getSession(uint256 sessionId) external view returns (Session memory) {
        return _existing(sessionId);
    }

    function getDedicatedNodes(uint256 sessionId) external view returns (address[] memory) {
        return dedicatedNodes[sessionId];
    }

    function _validate(Params calldata p) internal pure {
        if (p.minNumOfNodes == 0) revert InvalidParams("minNumOfNodes must be at least 1");
        if (p.maxNumOfNodes < p.minNumOfNodes) revert InvalidParams("maxNumOfNodes must be at least minNumOfNodes");
        if (p.maxNumOfNodes > MAX_NODES) revert InvalidParams("maxNumOfNodes may be at most 16");
        if (p.redundant == 0 || p.redundant > p.maxNumOfNodes) revert InvalidParams("redundant must be between 1 and maxNumOfNodes");
        if (p.mode > 2) revert InvalidParams("mode must be 0, 1 or 2");
        if (p.sla > 2) revert InvalidParams("sla must be 0, 1 or 2");
        if (p.maxTaskExecutionCount == 0) revert InvalidParams("maxTaskExecutionCount must be at least 1");
    }

    function _existing(uint256 sessionId) internal view returns (Session storage s) {
        s = sessions[sessionId];
        if (s.id == 0) revert NoSuchSession(sessionId);
    }

    function _owned(uint256 sessionId) internal view returns (Session storage s) {
        s = _existing(sessionId);
        if (s.owner != msg.sender) revert NotOwner(sessionId, msg.sender);
    }
}
