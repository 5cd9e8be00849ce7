# QEMU device config for openshell's qemu engine (x86_64-softmmu), used with
# `--without-default-devices --with-devices-x86_64=openshell-microvm` (see configure.args).
# Only what `-M microvm` with our command line needs: the board, which itself selects the ISA
# serial, the RTC, the PIT/PIC/IOAPIC and virtio-mmio, and the two vhost-user devices.
CONFIG_MICROVM=y
CONFIG_VHOST_USER_FS=y
CONFIG_VHOST_USER_VSOCK=y
