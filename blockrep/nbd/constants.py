"""NBD protocol constants, in the names of the spec (NetworkBlockDevice/nbd doc/proto.md).

`NBD_CMD_WRITE` is `NbdCmd.WRITE` here. Tests import these; nobody retypes the numbers.
"""

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option reply magic
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71

REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
STRUCTURED_REPLY_HEADER_SIZE = 20

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # our context id for base:allocation


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class NbdOpt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class NbdRep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9
    ERR_EXT_HEADER_REQD = 2**31 + 10


class NbdInfo(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class NbdCmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


REPLY_FLAG_DONE = 1


class NbdErr(IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """base:allocation descriptor flags."""
    HOLE = 1 << 0
    ZERO = 1 << 1
