package procbroker

import (
	"io"
	"os"
	"syscall"
)

// stdio returns the streams Run serves on: stdin, and a duplicate of
// stdout, fd 1 itself then pointing at stderr, so that whatever else the
// process prints there cannot break the frames. Pipes are made
// non-blocking, so that waiting on them parks a goroutine in the runtime's
// poller instead of holding a thread in a system call. restore undoes all
// that.
func stdio() (in io.Reader, out io.Writer, restore func(), err error) {
	in, restoreIn := pollable(0, "stdin")
	fd, err := syscall.Dup(1)
	if err != nil {
		return in, os.Stdout, restoreIn, nil
	}
	syscall.CloseOnExec(fd)
	if err := syscall.Dup3(2, 1, 0); err != nil {
		syscall.Close(fd)
		return in, os.Stdout, restoreIn, nil
	}
	frames, restoreOut := pollable(fd, "frames")
	return in, frames, func() {
		restoreIn()
		restoreOut()
		_ = syscall.Dup3(fd, 1, 0)
	}, nil
}

// pollable returns fd as a file the runtime polls, when it is a pipe or a
// socket (not a terminal, whose blocking mode other processes share).
func pollable(fd int, name string) (f *os.File, restore func()) {
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return os.NewFile(uintptr(fd), name), func() {}
	}
	kind := st.Mode & syscall.S_IFMT
	if kind != syscall.S_IFIFO && kind != syscall.S_IFSOCK {
		return os.NewFile(uintptr(fd), name), func() {}
	}
	dup, err := syscall.Dup(fd)
	if err != nil {
		return os.NewFile(uintptr(fd), name), func() {}
	}
	syscall.CloseOnExec(dup)
	if err := syscall.SetNonblock(dup, true); err != nil {
		syscall.Close(dup)
		return os.NewFile(uintptr(fd), name), func() {}
	}
	f = os.NewFile(uintptr(dup), name)
	return f, func() {
		f.Close()
		_ = syscall.SetNonblock(fd, false)
	}
}
