/*
 * stasis's built-in demo guest (x86-64, Intel syntax), assembled into the runtime crate by
 * `global_asm!` in runtime/src/kvm/demo.rs and copied by the VMM into guest memory at
 * DEMO_CODE. It is position-independent: only relative jumps and RIP-relative loads.
 *
 * The VMM starts every vCPU in 64-bit ring 0 at stasis_demo_entry with RSP pointing at an
 * iretq frame it built for that vCPU (RIP = stasis_demo_ring3, CS = user code, RFLAGS with
 * IOPL=3, RSP = its own ring-3 stack, SS = user data), so the only ring-0 instruction
 * (emulated slowly under PVM) is the iretq. Everything after runs in ring 3 at native speed
 * and does its I/O with in/out (the TSS's I/O bitmap opens every port). No SIPI: the VMM
 * sets each vCPU's registers itself. vCPUs share nothing but the code: each works on its own
 * slice of the work area.
 *
 * Registers on entry to ring 3 (set by the VMM):
 *   r10 = this vCPU's index (0 prints the banner; every report names it)
 *   r12 = guest-physical (= virtual, identity mapped) base of this vCPU's work slice
 *   r13 = number of 4 KiB pages in the slice (> 0)
 *   r14 = step limit (0: none)
 *   r15 = steps between reports (> 0)
 *   r8  = iterations of an empty delay loop before each step once the first pass over
 *         the work area is done (0: none; a guest that fills its memory, then dirties
 *         few pages, for pre-copy benchmarks)
 *   rbx = counter, rbp = checksum, r11 = page index, r9 = steps to the next report
 *         (all 0 / r15 at a fresh start)
 *
 * One step, with c the counter before it and v = (c + 1) * 0x9E3779B97F4A7C15:
 *   page p = c mod r13; old = first word of page p (what step c - r13 wrote there, or 0);
 *   checksum = rotl(checksum, 7) ^ old ^ v; word j of page p = v + j (j = 0..511); c += 1.
 * Every r15 steps (and at the limit) it reports (counter, checksum) on the report port as
 * its index to the index port (0x714), then four 32-bit writes: counter low, counter high,
 * checksum low, checksum high (commits). At the limit it writes 0 to the shutdown port.
 * (Guests started before multi-vCPU support kept the pattern multiplier in r10 and wrote no
 * index; their code travels in their images' memory, and the device accepts both.)
 */
    .section .rodata.stasis_demo_guest, "a"
    .globl stasis_demo_start, stasis_demo_end, stasis_demo_ring3
    .p2align 4
stasis_demo_start:
stasis_demo_entry:
    iretq

stasis_demo_ring3:
    test r10, r10
    jnz .Ldemo_banner_done
    lea rsi, [rip + .Ldemo_banner]
    mov dx, 0x3f8
.Ldemo_banner_loop:  mov al, byte ptr [rsi]
    test al, al
    jz .Ldemo_banner_done
    out dx, al
    inc rsi
    jmp .Ldemo_banner_loop
.Ldemo_banner_done:

.Ldemo_step:  /* one step (the delay only after the first pass over the work area) */
    cmp rbx, r13
    jb .Ldemo_go
    mov rcx, r8
.Ldemo_delay:  test rcx, rcx
    jz .Ldemo_go
    dec rcx
    jmp .Ldemo_delay
.Ldemo_go:  lea rcx, [rbx + 1]
    movabs rax, 0x9E3779B97F4A7C15
    imul rax, rcx
    mov rdi, r11
    shl rdi, 12
    add rdi, r12
    mov rcx, qword ptr [rdi]
    rol rbp, 7
    xor rbp, rcx
    xor rbp, rax
    xor ecx, ecx
.Ldemo_fill:  lea rsi, [rax + rcx]
    mov qword ptr [rdi + rcx * 8], rsi
    inc rcx
    cmp rcx, 512
    jb .Ldemo_fill
    inc rbx
    inc r11
    cmp r11, r13
    jb .Ldemo_wrapped
    xor r11d, r11d
.Ldemo_wrapped:  cmp rbx, r14
    je .Ldemo_limit
    dec r9
    jnz .Ldemo_step
    mov r9, r15
    call .Ldemo_report
    jmp .Ldemo_step

.Ldemo_limit:  /* the step limit: a last report, then shut down */
    call .Ldemo_report
    mov dx, 0x710
    xor eax, eax
    out dx, al
    jmp .Ldemo_limit

.Ldemo_report:  /* report (index, counter, checksum) */
    mov dx, 0x714
    mov eax, r10d
    out dx, eax
    mov dx, 0x700
    mov eax, ebx
    out dx, eax
    mov rax, rbx
    shr rax, 32
    add dx, 4
    out dx, eax
    mov eax, ebp
    add dx, 4
    out dx, eax
    mov rax, rbp
    shr rax, 32
    add dx, 4
    out dx, eax
    ret

.Ldemo_banner:  .asciz "stasis demo guest up\r\n"
    .p2align 4
stasis_demo_end:
