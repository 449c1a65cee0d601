package procbroker

import (
	"context"
	"errors"
	"fmt"
)

// Error codes. The broker's own errors carry one of these (with
// Source "broker"); a handler may reply with any code of its choosing
// (see Errorf), CodeHandler by default.
const (
	CodeUnknownTarget = "unknown_target"
	CodeUnavailable   = "unavailable"
	CodeBusy          = "busy"
	CodeTimeout       = "timeout"
	CodeWorkerExited  = "worker_exited"
	CodeUnknownMethod = "unknown_method"
	CodeBadRequest    = "bad_request"
	CodeTooLarge      = "too_large"
	CodeShuttingDown  = "shutting_down"
	CodeForbidden     = "forbidden"
	CodeInternal      = "internal"
	CodeCancelled     = "cancelled"
	// CodeHandler is the code of a handler's error that names no other.
	CodeHandler = "handler"
)

// CallError is a failed request: the error reply of a call (the callee's
// or the broker's), or why a call could not be made. A handler that
// returns one replies with its Code and Message.
type CallError struct {
	// Code is machine-readable: one of the Code constants or the
	// callee's own.
	Code string
	// Message is human-readable.
	Message string
	// Source is who answered with the error: the callee's process id,
	// "broker", or "" when the call never left this process.
	Source string
}

func (e *CallError) Error() string {
	if e.Message == "" {
		return e.Code
	}
	return e.Code + ": " + e.Message
}

// Errorf makes an error that a handler returns to reply with that code
// (a *CallError).
func Errorf(code, format string, args ...any) error {
	return &CallError{Code: code, Message: fmt.Sprintf(format, args...)}
}

// replyError is the code and message of the error reply for a handler's
// error: a *CallError anywhere in its chain gives its code (and its own
// message when it is the error itself), a context's end gives timeout or
// cancelled, anything else is CodeHandler with the error's text.
func replyError(err error) (code, message string) {
	var ce *CallError
	if errors.As(err, &ce) {
		if ce == err {
			return ce.Code, ce.Message
		}
		return ce.Code, err.Error()
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return CodeTimeout, err.Error()
	case errors.Is(err, context.Canceled):
		return CodeCancelled, err.Error()
	}
	return CodeHandler, err.Error()
}
