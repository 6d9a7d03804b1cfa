"""Devices and clients for presence, the UDP presence tracker (protocol v1).

    from presence import Device, Client
    with Device("127.0.0.1:7787", "boiler-7", interval=5.0) as device:
        device.beat(payload=b"fw=1.4")
    print(Client("127.0.0.1:7787").device("boiler-7"))
"""

from . import auth, wire
from .net import Client, Device, QueryError, list_all
from .wire import Ack, DecodeError, DeviceInfo, EncodeError, ErrorReply, Page, Status, Summary, Unknown

__all__ = [
    "Ack", "Client", "DecodeError", "Device", "DeviceInfo", "EncodeError", "ErrorReply", "Page", "QueryError",
    "Status", "Summary", "Unknown", "auth", "list_all", "wire",
]
__version__ = "0.1.0"
