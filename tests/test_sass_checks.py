"""The SASS dataflow check the Gluon compile tests rely on, on hand-written disassembly."""

from __future__ import annotations

from sass_checks import descriptor_reads_before_writes


def _sass(*instructions: str) -> str:
    """Disassembly lines as cuobjdump prints them, 16 bytes an instruction."""
    return "\n".join(
        f"        /*{16 * i:04x}*/                   {text} ;   /* 0x0 */"
        for i, text in enumerate(instructions)
    )


DESCRIPTORS = ("UMOV UR4, 0x10", "UMOV UR5, 0x40000040", "UMOV UR6, 0x20", "UMOV UR7, 0x40000040")


def test_descriptors_written_before_the_wgmma_pass() -> None:
    sass = _sass(*DESCRIPTORS, "IGMMA.64x128x32.S8.S8 R24, gdesc[UR4], RZ, !UPT", "EXIT")
    assert descriptor_reads_before_writes(sass) == []


def test_a_descriptor_written_on_one_path_only_is_found() -> None:
    sass = _sass(
        "UMOV UR4, 0x10",
        "UMOV UR5, 0x40000040",
        "UMOV UR7, 0x40000040",
        "ISETP.GE.AND P0, PT, R2, R3, PT",
        "@P0 BRA 0x0070",  # skips the write of UR6
        "UMOV UR6, 0x20",
        "NOP",
        "IGMMA.64x128x32.S8.S8 R24, gdesc[UR4], RZ, !UPT",  # /*0070*/
        "EXIT",
    )
    assert descriptor_reads_before_writes(sass) == [(0x70, "UR6")]


def test_a_value_computed_from_an_unwritten_register_is_not_defined() -> None:
    # The ptxas 12.8 pattern: the next k-step's B descriptor copied from a register nothing wrote.
    sass = _sass(
        "UMOV UR19, 0x40000040",
        "UIADD3 UR18, UR6, 0x2, URZ",
        "QGMMA.64x128x32.F32.E4M3.E4M3 R88, R28, gdesc[UR16], R88",
        "EXIT",
    )
    assert descriptor_reads_before_writes(sass) == [(0x20, "UR18")]


def test_a_predicated_write_does_not_define_and_a_64_bit_one_defines_both_halves() -> None:
    sass = _sass(
        "UMOV UR4, 0x10",
        "UMOV UR5, 0x40000040",
        "UIADD3.64 UR6, UR4, 0x2, URZ",  # UR6 and UR7
        "IGMMA.64x128x32.S8.S8 R24, gdesc[UR4], RZ, !UPT",
        "@UP0 UMOV UR18, 0x30",
        "UMOV UR19, 0x40000040",
        "QGMMA.64x128x32.F32.E4M3.E4M3 R88, R28, gdesc[UR16], R88",
        "EXIT",
    )
    assert descriptor_reads_before_writes(sass) == [(0x60, "UR18")]


def test_partitions_behind_a_jump_table_start_from_what_the_prologue_wrote() -> None:
    sass = _sass(
        *DESCRIPTORS[:3],  # not UR7
        "LDC R2, c[0x2][R0]",
        "BRX R2 -0x60",
        "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0",  # /*0050*/: a partition, retried in a loop
        "@!P0 BRA 0x0050",
        "IGMMA.64x128x32.S8.S8 R24, gdesc[UR4], RZ, !UPT",
        "EXIT",
        "QGMMA.64x128x32.F32.E4M3.E4M3 R88, R28, gdesc[UR8], R88",  # /*0090*/: another one
        "EXIT",
    )
    # The retry loop's backward branch does not make the first partition reachable without the
    # jump table (it would then look fully defined).
    found = [(0x70, "UR7"), (0x90, "UR10"), (0x90, "UR11")]
    assert descriptor_reads_before_writes(sass) == found
