// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama executes it: the template gets .System,
// .Messages (each with .Role, .Content and .ToolCalls) and .Tools, the function json, and missing keys are zero.
// Reads {"template": ..., "cases": [{"System": ..., "Messages": [...], "Tools": [...]}]} as JSON on stdin and prints
// {"renderings": [...], "tool_tag": ...}: tool_tag is the text Ollama's tool-call parser takes as the tag that opens
// a call (the first text node under the first `if` on .ToolCalls, trimmed, up to its first "{").
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// The shapes of Ollama's api.ToolCall, api.Tool and api.Message, as far as a template sees them.
type ToolCallFunction struct {
	Index     int             `json:"index"`
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type ToolFunction struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

type Values struct {
	System   string
	Messages []*Message
	Tools    []Tool
	Prompt   string
	Response string
}

type Input struct {
	Template string   `json:"template"`
	Cases    []Values `json:"cases"`
}

type Output struct {
	Renderings []string `json:"renderings"`
	ToolTag    string   `json:"tool_tag"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func mentionsToolCalls(pipe *parse.PipeNode) bool {
	for _, cmd := range pipe.Cmds {
		for _, arg := range cmd.Args {
			if field, ok := arg.(*parse.FieldNode); ok {
				for _, ident := range field.Ident {
					if ident == "ToolCalls" {
						return true
					}
				}
			}
		}
	}
	return false
}

// branches: the lists a node holds, in order
func branches(node parse.Node) []*parse.ListNode {
	switch n := node.(type) {
	case *parse.ListNode:
		return []*parse.ListNode{n}
	case *parse.IfNode:
		return []*parse.ListNode{n.List, n.ElseList}
	case *parse.RangeNode:
		return []*parse.ListNode{n.List, n.ElseList}
	case *parse.WithNode:
		return []*parse.ListNode{n.List, n.ElseList}
	}
	return nil
}

func toolCallsIf(node parse.Node) *parse.IfNode {
	if n, ok := node.(*parse.IfNode); ok && mentionsToolCalls(n.Pipe) {
		return n
	}
	for _, list := range branches(node) {
		if list == nil {
			continue
		}
		for _, child := range list.Nodes {
			if found := toolCallsIf(child); found != nil {
				return found
			}
		}
	}
	return nil
}

// firstText: the first text node, looking into the first branch that holds one; an action ends the search
func firstText(nodes []parse.Node) (*parse.TextNode, bool) {
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.TextNode:
			return n, true
		case *parse.ActionNode:
			return nil, true
		default:
			for _, list := range branches(n) {
				if list != nil {
					if text, _ := firstText(list.Nodes); text != nil {
						return text, true
					}
				}
			}
			if _, ok := n.(*parse.ListNode); !ok {
				return nil, true
			}
		}
	}
	return nil, false
}

func toolTag(tmpl *template.Template) string {
	found := toolCallsIf(tmpl.Tree.Root)
	if found == nil {
		return ""
	}
	text, _ := firstText(found.List.Nodes)
	if text == nil {
		return ""
	}
	return strings.Split(strings.TrimSpace(string(text.Text)), "{")[0]
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	out := Output{Renderings: []string{}, ToolTag: toolTag(tmpl)}
	for _, values := range in.Cases {
		var b strings.Builder
		if err := tmpl.Execute(&b, values); err != nil {
			panic(err)
		}
		out.Renderings = append(out.Renderings, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
