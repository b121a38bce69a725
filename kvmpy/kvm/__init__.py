"""The KVM ABI: ioctl numbers, struct layouts and fd wrappers."""

from kvmpy.kvm.system import Kvm, VcpuFd, VmFd, detect_backend

__all__ = ["Kvm", "VmFd", "VcpuFd", "detect_backend"]
