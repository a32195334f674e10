// go_poll: one command against the agent with Go's golang.org/x/crypto/ssh, as a MITIGATOR built
// in Go would send it. Built offline by tests/integration/test_client_libraries.py against
// Debian's golang-golang-x-crypto-dev.
//
//	go_poll HOST PORT PRIVATE-KEY-FILE HOST-KEY-PUB-FILE COMMAND
//
// The host key is pinned (the agent's .pub file), the key is the instance's ed25519 key. The
// command's stdout and stderr are passed through and its exit status is ours; a failure to
// connect or log in prints one line on stderr and exits 255, as ssh does.
package main

import (
	"bytes"
	"fmt"
	"net"
	"os"

	"golang.org/x/crypto/ssh"
)

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "go_poll: %s: %v\n", what, err)
	os.Exit(255)
}

func main() {
	if len(os.Args) != 6 {
		fmt.Fprintln(os.Stderr, "usage: go_poll HOST PORT PRIVATE-KEY-FILE HOST-KEY-PUB-FILE COMMAND")
		os.Exit(2)
	}
	host, port, keyFile, hostKeyFile, command := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		fail("reading the key", err)
	}
	signer, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		fail("parsing the key", err)
	}
	hostKeyLine, err := os.ReadFile(hostKeyFile)
	if err != nil {
		fail("reading the host key", err)
	}
	hostKey, _, _, _, err := ssh.ParseAuthorizedKey(hostKeyLine)
	if err != nil {
		fail("parsing the host key", err)
	}
	config := &ssh.ClientConfig{
		User:              "mitigator_agent",
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   ssh.FixedHostKey(hostKey),
		HostKeyAlgorithms: []string{ssh.KeyAlgoED25519},
	}
	client, err := ssh.Dial("tcp", net.JoinHostPort(host, port), config)
	if err != nil {
		fail("connecting", err)
	}
	defer client.Close()
	session, err := client.NewSession()
	if err != nil {
		fail("opening a session", err)
	}
	var stdout, stderr bytes.Buffer
	session.Stdout, session.Stderr = &stdout, &stderr
	err = session.Run(command)
	os.Stdout.Write(stdout.Bytes())
	os.Stderr.Write(stderr.Bytes())
	if exit, ok := err.(*ssh.ExitError); ok {
		os.Exit(exit.ExitStatus())
	} else if err != nil {
		fail("running the command", err)
	}
}
